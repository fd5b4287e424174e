//! Matrix expansion: a step with a `matrix` becomes one concrete step per combination of its
//! values, named `test[os=linux,version=1]` and given `MATRIX_<KEY>` in its env.

use std::collections::BTreeMap;

pub(super) fn is_matrix_key(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}

/// Every combination of a matrix, in key order then value order.
pub(super) fn combinations(
    matrix: &BTreeMap<String, Vec<String>>,
) -> Vec<BTreeMap<String, String>> {
    let mut out = vec![BTreeMap::new()];
    for (key, values) in matrix {
        out = out
            .into_iter()
            .flat_map(|combo| {
                values.iter().map(move |v| {
                    let mut c = combo.clone();
                    c.insert(key.clone(), v.clone());
                    c
                })
            })
            .collect();
    }
    out
}

/// The first combination of a matrix (each key's first value), without expanding the rest.
pub(super) fn first_combination(
    matrix: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, String> {
    matrix
        .iter()
        .filter_map(|(key, values)| Some((key.clone(), values.first()?.clone())))
        .collect()
}

/// The combination whose expanded name is the longest: each key with its longest value.
pub(super) fn longest_combination(
    matrix: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, String> {
    matrix
        .iter()
        .filter_map(|(key, values)| {
            Some((key.clone(), values.iter().max_by_key(|v| v.len())?.clone()))
        })
        .collect()
}

pub(super) fn combination_count(matrix: &BTreeMap<String, Vec<String>>) -> usize {
    matrix
        .values()
        .fold(1usize, |n, values| n.saturating_mul(values.len()))
}

/// `test[os=linux,version=1]`.
pub(super) fn expanded_name(base: &str, combo: &BTreeMap<String, String>) -> String {
    if combo.is_empty() {
        return base.to_owned();
    }
    let parts: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{base}[{}]", parts.join(","))
}

pub(super) fn matrix_env(combo: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    combo
        .iter()
        .map(|(k, v)| (format!("MATRIX_{}", k.to_ascii_uppercase()), v.clone()))
        .collect()
}
