//! Removing whole residual blocks: `y = x + f(x)` becomes `y = x`, and every node of `f` goes.

use serde::Serialize;
use smelt_ir::{Graph, Node};
use smelt_tensor::{bail, DType, Result};
use std::collections::{HashMap, HashSet};

#[derive(Clone, Debug, Serialize)]
pub struct Block {
    /// The residual Add.
    pub add: String,
    /// The skip input (what the block's output becomes).
    pub skip: String,
    /// Names (labels) of the branch's nodes.
    pub nodes: Vec<String>,
    #[serde(skip)]
    pub add_node: usize,
    #[serde(skip)]
    pub branch: Vec<usize>,
}

/// The nodes computing `out` from `skip` alone (and constants), or None when `out` depends on
/// anything else or an intermediate value escapes the branch.
fn branch(g: &Graph, skip: &str, out: &str, add: usize) -> Option<Vec<usize>> {
    let mut nodes = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![out.to_string()];
    let mut reaches_skip = false;
    while let Some(v) = stack.pop() {
        if v == skip {
            reaches_skip = true;
            continue;
        }
        if v.is_empty() || g.initializers.contains_key(&v) || !seen.insert(v.clone()) {
            continue;
        }
        let p = g.producer(&v)?; // a graph input other than the skip: not a residual branch
        if !nodes.contains(&p) {
            nodes.push(p);
            stack.extend(g.nodes[p].inputs.iter().cloned());
        }
    }
    if !reaches_skip || nodes.is_empty() {
        return None;
    }
    let inside: HashSet<usize> = nodes.iter().copied().chain([add]).collect();
    let outputs: HashSet<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
    for &n in &nodes {
        for o in &g.nodes[n].outputs {
            if outputs.contains(o.as_str()) || g.consumers(o).iter().any(|c| !inside.contains(c)) {
                return None;
            }
        }
    }
    nodes.sort_unstable();
    Some(nodes)
}

/// Residual blocks: Adds of two runtime values of equal shape where one is computed from the
/// other through a branch used by nothing else. `shapes` rules out broadcasting Adds.
pub fn find(g: &Graph, shapes: &HashMap<String, (DType, Vec<usize>)>) -> Vec<Block> {
    let mut out = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if n.op_type != "Add" || !n.domain.is_empty() || n.inputs.len() != 2 {
            continue;
        }
        let same = |a: &str, b: &str| {
            shapes
                .get(a)
                .map(|s| &s.1)
                .is_some_and(|s| Some(s) == shapes.get(b).map(|t| &t.1))
        };
        let (a, b) = (&n.inputs[0], &n.inputs[1]);
        if !same(a, &n.outputs[0]) || !same(b, &n.outputs[0]) {
            continue;
        }
        let found = [(a, b), (b, a)]
            .into_iter()
            .filter_map(|(skip, out)| branch(g, skip, out, i).map(|br| (skip, br)))
            .min_by_key(|(_, br)| br.len());
        if let Some((skip, br)) = found {
            out.push(Block {
                add: n.label(),
                skip: skip.clone(),
                nodes: br.iter().map(|&k| g.nodes[k].label()).collect(),
                add_node: i,
                branch: br,
            });
        }
    }
    out
}

/// Does `pattern` name this block: its Add, or any node of its branch.
pub fn names(g: &Graph, b: &Block, pattern: &str) -> bool {
    let m = |n: &Node| smelt_ir::pattern::matches_node(pattern, n) && n.op_type != pattern;
    m(&g.nodes[b.add_node]) || b.branch.iter().any(|&k| m(&g.nodes[k]))
}

/// Replaces the block's Add by its skip input; the branch becomes dead and is removed.
pub fn remove(g: &mut Graph, b: &Block) -> Result<()> {
    let add = &g.nodes[b.add_node];
    if add.op_type != "Add" {
        bail!(Invalid, "{}: not the residual Add it was", add.label());
    }
    let out = add.outputs[0].clone();
    let is_output = g.outputs.iter().any(|o| o.name == out);
    if is_output {
        // The output name must stay: the Add becomes an Identity of the skip.
        let n = &mut g.nodes[b.add_node];
        n.op_type = "Identity".into();
        n.inputs = vec![b.skip.clone()];
    } else {
        for n in g.nodes.iter_mut() {
            for x in n.inputs.iter_mut().filter(|x| **x == out) {
                *x = b.skip.clone();
            }
        }
    }
    g.value_info.retain(|v| v.name != out || is_output);
    g.remove_dead();
    Ok(())
}
