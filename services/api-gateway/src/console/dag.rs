//! A pipeline run's steps drawn as a graph: steps as boxes coloured by state, `needs` as
//! arrows, the steps a matrix expanded from one written step grouped in one frame. Columns
//! are the steps' depth in the graph (a step stands right of everything it needs).

use std::collections::HashMap;

use maud::{Markup, html};

use super::views::short_id;

/// One concrete step as the graph needs it.
pub(super) struct Node<'a> {
    /// `test[os=linux]` for a matrix combination, else the written name.
    pub name: &'a str,
    /// The step as written.
    pub base: &'a str,
    /// Concrete or written names of the steps it needs.
    pub needs: &'a [String],
    pub state: String,
    pub job_id: &'a str,
}

const BOX_W: i32 = 200;
const BOX_H: i32 = 46;
const GAP_Y: i32 = 12;
const COLUMN_W: i32 = 270;
const GROUP_PAD: i32 = 10;
const GROUP_HEADER: i32 = 22;
const MARGIN: i32 = 16;

/// A written step and the concrete steps it became, in the run's order.
struct Group<'a> {
    base: &'a str,
    members: Vec<&'a Node<'a>>,
    needs: Vec<usize>,
    column: usize,
    x: i32,
    y: i32,
    height: i32,
}

impl Group<'_> {
    /// Whether the step was expanded by a matrix (drawn in a frame).
    fn framed(&self) -> bool {
        self.members.len() > 1 || self.members.iter().any(|m| m.name != m.base)
    }
}

/// Where each group stands: its column is one more than the deepest group it needs. Also
/// returns how far down each column is filled (an arrow that skips columns runs below them).
fn layout<'a>(nodes: &'a [Node<'a>]) -> (Vec<Group<'a>>, HashMap<usize, i32>) {
    let mut groups: Vec<Group<'a>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for node in nodes {
        let at = *index.entry(node.base).or_insert_with(|| {
            groups.push(Group {
                base: node.base,
                members: Vec::new(),
                needs: Vec::new(),
                column: 0,
                x: 0,
                y: 0,
                height: 0,
            });
            groups.len() - 1
        });
        groups[at].members.push(node);
    }
    // A need names a written step or one of its combinations: both lead to its group.
    let by_name: HashMap<&str, &str> = nodes.iter().map(|n| (n.name, n.base)).collect();
    for group in &mut groups {
        let mut needs: Vec<usize> = group
            .members
            .iter()
            .flat_map(|m| m.needs.iter())
            .filter_map(|need| {
                let base = by_name.get(need.as_str()).copied().unwrap_or(need.as_str());
                index.get(base).copied()
            })
            .collect();
        needs.sort_unstable();
        needs.dedup();
        group.needs = needs;
    }
    // Longest path, relaxed as often as there are groups (the graph has no cycle; a cycle in
    // stored data would only stop moving columns on, not loop).
    for _ in 0..groups.len() {
        let mut moved = false;
        for i in 0..groups.len() {
            let column = groups[i]
                .needs
                .iter()
                .filter(|&&n| n != i)
                .map(|&n| groups[n].column + 1)
                .max()
                .unwrap_or(0);
            if column != groups[i].column {
                groups[i].column = column;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let mut column_bottom: HashMap<usize, i32> = HashMap::new();
    for group in &mut groups {
        let inner = group.members.len() as i32 * (BOX_H + GAP_Y) - GAP_Y;
        group.height = if group.framed() {
            inner + 2 * GROUP_PAD + GROUP_HEADER
        } else {
            inner
        };
        let bottom = column_bottom.entry(group.column).or_insert(MARGIN);
        group.x = MARGIN + group.column as i32 * COLUMN_W;
        group.y = *bottom;
        *bottom += group.height + 2 * GAP_Y;
    }
    (groups, column_bottom)
}

/// An arrow from the right of `from` to the left of `to`; one that skips columns drops into
/// the free lane under them instead of crossing their boxes.
fn edge(from: &Group<'_>, to: &Group<'_>, bottoms: &HashMap<usize, i32>) -> (String, i32) {
    let right = if from.framed() { 2 * GROUP_PAD } else { 0 };
    let (x1, y1) = (from.x + BOX_W + right, from.y + from.height / 2);
    let (x2, y2) = (to.x - 4, to.y + to.height / 2);
    if to.column <= from.column + 1 {
        let bend = (x2 - x1) / 2;
        return (
            format!(
                "M{x1},{y1} C{},{y1} {},{y2} {x2},{y2}",
                x1 + bend,
                x2 - bend
            ),
            y1.max(y2),
        );
    }
    let lane = (from.column + 1..to.column)
        .filter_map(|c| bottoms.get(&c))
        .copied()
        .max()
        .unwrap_or(MARGIN)
        - GAP_Y;
    let lane = lane.max(y1).max(y2);
    (
        format!(
            "M{x1},{y1} C{a},{y1} {a},{lane} {b},{lane} L{c},{lane} C{d},{lane} {d},{y2} {x2},{y2}",
            a = x1 + 30,
            b = x1 + 60,
            c = x2 - 60,
            d = x2 - 30,
        ),
        lane,
    )
}

/// Cuts a name to what fits in a box.
fn fit(name: &str, chars: usize) -> String {
    if name.chars().count() <= chars {
        name.to_owned()
    } else {
        let cut: String = name.chars().take(chars.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// The run's graph as inline SVG.
pub(super) fn render(nodes: &[Node<'_>]) -> Markup {
    let (groups, bottoms) = layout(nodes);
    let width = groups
        .iter()
        .map(|g| g.x + BOX_W + 2 * GROUP_PAD)
        .max()
        .unwrap_or(0)
        + MARGIN;
    let edges: Vec<(String, i32)> = groups
        .iter()
        .enumerate()
        .flat_map(|(at, to)| {
            // A combination that needs a sibling of its own matrix draws no arrow to itself.
            to.needs
                .iter()
                .filter(move |&&from| from != at)
                .filter_map(|&from| groups.get(from).map(|from| edge(from, to, &bottoms)))
        })
        .collect();
    let height = groups
        .iter()
        .map(|g| g.y + g.height)
        .chain(edges.iter().map(|(_, lowest)| *lowest))
        .max()
        .unwrap_or(0)
        + MARGIN;
    html! {
        svg.dag xmlns="http://www.w3.org/2000/svg" role="group"
            aria-label="The run's steps as a graph; the table below lists them too"
            width=(width) height=(height) viewBox=(format!("0 0 {width} {height}")) {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"
                    markerHeight="7" orient="auto-start-reverse" {
                    path.arrowhead d="M0,0 L10,5 L0,10 z" {}
                }
            }
            @for (d, _) in &edges {
                path.edge d=(d) marker-end="url(#arrow)" {}
            }
            @for group in &groups {
                @let framed = group.framed();
                @if framed {
                    g.matrix data-base=(group.base) {
                        rect.frame x=(group.x) y=(group.y) width=(BOX_W + 2 * GROUP_PAD)
                            height=(group.height) rx="8" {}
                        text.frame-title x=(group.x + GROUP_PAD) y=(group.y + 16) {
                            (fit(group.base, 16)) " · matrix of " (group.members.len())
                        }
                    }
                }
                @for (i, node) in group.members.iter().enumerate() {
                    @let x = if framed { group.x + GROUP_PAD } else { group.x };
                    @let y = group.y + if framed { GROUP_PAD + GROUP_HEADER } else { 0 }
                        + i as i32 * (BOX_H + GAP_Y);
                    (step_box(node, x, y))
                }
            }
        }
    }
}

fn step_box(node: &Node<'_>, x: i32, y: i32) -> Markup {
    let label = if node.name != node.base {
        node.name
            .strip_prefix(node.base)
            .unwrap_or(node.name)
            .trim_matches(|c| c == '[' || c == ']')
    } else {
        node.name
    };
    let body = html! {
        title { (node.name) ": " (node.state) }
        rect.step x=(x) y=(y) width=(BOX_W) height=(BOX_H) rx="6" {}
        text.step-name x=(x + 10) y=(y + 19) { (fit(label, 26)) }
        text.step-state x=(x + 10) y=(y + 36) { (node.state.replace('_', " ")) }
    };
    html! {
        @if node.job_id.is_empty() {
            g class={ "node s-" (node.state) } data-step=(node.name) data-state=(node.state) {
                (body)
            }
        } @else {
            a href={ "/jobs/" (node.job_id) } aria-label={ "step " (node.name) ", " (node.state) ", open its job" } {
                g class={ "node s-" (node.state) } data-step=(node.name) data-state=(node.state)
                    data-job=(node.job_id) {
                    (body)
                }
            }
        }
    }
}

/// The job id of a step as a short link, for the table under the graph.
pub(super) fn job_link(job_id: &str) -> Markup {
    html! {
        @if job_id.is_empty() { span.none { "–" } }
        @else { a href={ "/jobs/" (job_id) } { (short_id(job_id)) } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node<'a>(name: &'a str, base: &'a str, needs: &'a [String]) -> Node<'a> {
        Node {
            name,
            base,
            needs,
            state: "waiting".into(),
            job_id: "",
        }
    }

    #[test]
    fn steps_stand_right_of_what_they_need_and_matrices_are_grouped() {
        let none: Vec<String> = vec![];
        let build = vec!["build".to_owned()];
        let deploy_needs = vec![
            "test[os=linux]".to_owned(),
            "test[os=mac]".to_owned(),
            "lint".to_owned(),
        ];
        let nodes = [
            node("build", "build", &none),
            node("lint", "lint", &none),
            node("test[os=linux]", "test", &build),
            node("test[os=mac]", "test", &build),
            node("deploy", "deploy", &deploy_needs),
        ];
        let (groups, _) = layout(&nodes);
        let column = |base: &str| groups.iter().find(|g| g.base == base).unwrap().column;
        assert_eq!(column("build"), 0);
        assert_eq!(column("lint"), 0);
        assert_eq!(column("test"), 1);
        assert_eq!(column("deploy"), 2);
        let test = groups.iter().find(|g| g.base == "test").unwrap();
        assert!(test.framed());
        assert_eq!(test.members.len(), 2);
        // Two groups of one column do not overlap.
        let (b, l) = (&groups[0], &groups[1]);
        assert!(l.y >= b.y + b.height);
        let svg = render(&nodes).into_string();
        assert_eq!(svg.matches("class=\"edge\"").count(), 3);
        // lint → deploy skips the test column: it runs under the matrix's frame.
        let lane = test.y + test.height;
        assert!(svg.contains(&format!(",{} L", lane + GAP_Y)), "{svg}");
        assert!(svg.contains("data-step=\"test[os=mac]\""));
    }
}
