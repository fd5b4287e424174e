//! The graph of a pipeline's steps (each step to the steps it needs).

use std::collections::BTreeMap;

/// A cycle through `start`, as the list of steps on it, if there is one reachable from it.
pub(super) fn find_cycle(steps: &BTreeMap<&str, Vec<&str>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Unseen,
        OnPath,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> = steps.keys().map(|k| (*k, Mark::Unseen)).collect();
    for start in steps.keys() {
        if marks.get(start) != Some(&Mark::Unseen) {
            continue;
        }
        // Iterative depth-first search: (node, index of the next need to visit).
        let mut path: Vec<(&str, usize)> = vec![(start, 0)];
        marks.insert(start, Mark::OnPath);
        while let Some((node, next)) = path.last().copied() {
            let needs = steps.get(node).map(Vec::as_slice).unwrap_or_default();
            match needs.get(next) {
                Some(need) => {
                    if let Some(top) = path.last_mut() {
                        top.1 += 1;
                    }
                    match marks.get(need).copied() {
                        Some(Mark::Unseen) => {
                            marks.insert(need, Mark::OnPath);
                            path.push((need, 0));
                        }
                        Some(Mark::OnPath) => {
                            let from = path.iter().position(|(n, _)| n == need).unwrap_or(0);
                            let mut cycle: Vec<String> =
                                path[from..].iter().map(|(n, _)| (*n).to_owned()).collect();
                            cycle.push((*need).to_owned());
                            return Some(cycle);
                        }
                        // Done, or unknown (reported elsewhere).
                        _ => {}
                    }
                }
                None => {
                    marks.insert(node, Mark::Done);
                    path.pop();
                }
            }
        }
    }
    None
}
