use indexmap::IndexMap;
use smelt_tensor::{bail, DType, Error, Result, Tensor};
use std::collections::{HashMap, HashSet};

/// One dimension of a declared shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(usize),
    /// A named symbolic dimension such as "batch".
    Sym(String),
    Unknown,
}

/// A typed value declaration: graph input/output or intermediate annotation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub dtype: Option<DType>,
    /// `None` when the rank itself is unknown.
    pub shape: Option<Vec<Dim>>,
    pub doc_string: String,
}

impl ValueInfo {
    pub fn new(name: &str, dtype: DType, shape: Vec<Dim>) -> Self {
        ValueInfo {
            name: name.to_string(),
            dtype: Some(dtype),
            shape: Some(shape),
            doc_string: String::new(),
        }
    }

    /// The concrete shape if every dimension is fixed.
    pub fn fixed_shape(&self) -> Option<Vec<usize>> {
        self.shape
            .as_ref()?
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                _ => None,
            })
            .collect()
    }
}

/// Attribute values, one variant per ONNX attribute type we carry.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Tensor(Tensor),
    Graph(Box<Graph>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Vec<u8>>),
    Tensors(Vec<Tensor>),
    Graphs(Vec<Graph>),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// "" for the default ONNX domain.
    pub domain: String,
    /// Input value names; "" marks an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: IndexMap<String, Attr>,
    pub doc_string: String,
}

impl Node {
    pub fn new(op_type: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: name.to_string(),
            op_type: op_type.to_string(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn with_attr(mut self, key: &str, v: Attr) -> Node {
        self.attrs.insert(key.to_string(), v);
        self
    }

    /// How to name this node in messages: its name, or its op type and first output.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!(
                "{} node -> {}",
                self.op_type,
                self.outputs.first().map(String::as_str).unwrap_or("?")
            )
        } else {
            format!("{} node '{}'", self.op_type, self.name)
        }
    }

    fn attr_err(&self, key: &str, want: &str) -> Error {
        Error::Invalid(format!("{}: attribute '{key}' is not {want}", self.label()))
    }

    pub fn attr_int(&self, key: &str) -> Result<Option<i64>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Int(v)) => Ok(Some(*v)),
            Some(_) => Err(self.attr_err(key, "an int")),
        }
    }
    pub fn attr_float(&self, key: &str) -> Result<Option<f32>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Float(v)) => Ok(Some(*v)),
            Some(Attr::Int(v)) => Ok(Some(*v as f32)),
            Some(_) => Err(self.attr_err(key, "a float")),
        }
    }
    pub fn attr_ints(&self, key: &str) -> Result<Option<&[i64]>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Ints(v)) => Ok(Some(v)),
            Some(_) => Err(self.attr_err(key, "a list of ints")),
        }
    }
    pub fn attr_floats(&self, key: &str) -> Result<Option<&[f32]>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Floats(v)) => Ok(Some(v)),
            Some(_) => Err(self.attr_err(key, "a list of floats")),
        }
    }
    pub fn attr_string(&self, key: &str) -> Result<Option<String>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::String(v)) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
            Some(_) => Err(self.attr_err(key, "a string")),
        }
    }
    pub fn attr_tensor(&self, key: &str) -> Result<Option<&Tensor>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Tensor(t)) => Ok(Some(t)),
            Some(_) => Err(self.attr_err(key, "a tensor")),
        }
    }
    pub fn attr_graph(&self, key: &str) -> Result<Option<&Graph>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Graph(g)) => Ok(Some(g)),
            Some(_) => Err(self.attr_err(key, "a graph")),
        }
    }
}

/// A dataflow graph. Values are identified by name; initializers are constant values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub name: String,
    pub doc_string: String,
    /// Runtime inputs. ONNX allows initializers to be listed here too (as overridable
    /// defaults); `runtime_inputs` filters those out.
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub value_info: Vec<ValueInfo>,
    pub initializers: IndexMap<String, Tensor>,
    pub nodes: Vec<Node>,
}

impl Graph {
    /// Inputs the caller must feed (those without an initializer).
    pub fn runtime_inputs(&self) -> impl Iterator<Item = &ValueInfo> {
        self.inputs
            .iter()
            .filter(|v| !self.initializers.contains_key(&v.name))
    }

    /// Index of the node producing `value`, if any.
    pub fn producer(&self, value: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.outputs.iter().any(|o| o == value))
    }

    /// Indices of the nodes reading `value`.
    pub fn consumers(&self, value: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.inputs.iter().any(|i| i == value))
            .map(|(i, _)| i)
            .collect()
    }

    /// Every value name in use (inputs, initializers, node outputs).
    pub fn value_names(&self) -> HashSet<String> {
        let mut s: HashSet<String> = self.inputs.iter().map(|v| v.name.clone()).collect();
        s.extend(self.initializers.keys().cloned());
        for n in &self.nodes {
            s.extend(n.outputs.iter().cloned());
        }
        s
    }

    /// A value or node name starting with `prefix` that is not yet used.
    pub fn unique_name(&self, prefix: &str) -> String {
        let used = self.value_names();
        let nodes: HashSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        if !used.contains(prefix) && !nodes.contains(prefix) {
            return prefix.to_string();
        }
        (1..)
            .map(|i| format!("{prefix}_{i}"))
            .find(|c| !used.contains(c) && !nodes.contains(c.as_str()))
            .expect("an unused name exists")
    }

    /// Node indices in an order where every producer precedes its consumers. Fails on a cycle,
    /// on an input that nothing provides, and on a value produced twice, naming the culprit.
    /// `outer` lists values visible from an enclosing graph (for subgraphs).
    pub fn topo_order_with(&self, outer: &HashSet<String>) -> Result<Vec<usize>> {
        let mut producer: HashMap<&str, usize> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                if producer.insert(o, i).is_some() {
                    bail!(Invalid, "value '{o}' is produced by more than one node");
                }
                if self.initializers.contains_key(o) {
                    bail!(
                        Invalid,
                        "value '{o}' is both an initializer and a node output"
                    );
                }
            }
        }
        let available: HashSet<&str> = self
            .inputs
            .iter()
            .map(|v| v.name.as_str())
            .chain(self.initializers.keys().map(String::as_str))
            .collect();
        // Kahn's algorithm, taking ready nodes in file order so the result is deterministic.
        let mut pending = vec![0usize; self.nodes.len()];
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            let mut deps: Vec<usize> = Vec::new();
            for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
                if let Some(&p) = producer.get(inp.as_str()) {
                    deps.push(p);
                } else if !available.contains(inp.as_str()) && !outer.contains(inp) {
                    bail!(
                        Invalid,
                        "{} reads '{inp}', which no node, input or initializer provides",
                        n.label()
                    );
                }
            }
            // Values captured from the outer scope by subgraphs also order this node.
            for g in subgraphs(n) {
                for inp in g.free_values() {
                    if let Some(&p) = producer.get(inp.as_str()) {
                        deps.push(p);
                    }
                }
            }
            deps.sort_unstable();
            deps.dedup();
            for p in deps {
                if p == i {
                    bail!(Invalid, "{} reads its own output (a cycle)", n.label());
                }
                users[p].push(i);
                pending[i] += 1;
            }
        }
        let mut ready: std::collections::BTreeSet<usize> =
            (0..self.nodes.len()).filter(|&i| pending[i] == 0).collect();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &u in &users[i] {
                pending[u] -= 1;
                if pending[u] == 0 {
                    ready.insert(u);
                }
            }
        }
        if order.len() != self.nodes.len() {
            let stuck = (0..self.nodes.len()).find(|&i| pending[i] > 0).unwrap();
            bail!(
                Invalid,
                "the graph has a cycle through {}",
                self.nodes[stuck].label()
            );
        }
        Ok(order)
    }

    pub fn topo_order(&self) -> Result<Vec<usize>> {
        self.topo_order_with(&HashSet::new())
    }

    /// Reorders `nodes` topologically (a no-op for an already sorted graph).
    pub fn sort(&mut self) -> Result<()> {
        let order = self.topo_order()?;
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        self.nodes = order.into_iter().map(|i| old[i].take().unwrap()).collect();
        Ok(())
    }

    /// Values a subgraph reads but does not define itself (captured from the outer scope).
    pub fn free_values(&self) -> Vec<String> {
        let mut defined: HashSet<&str> = self
            .inputs
            .iter()
            .map(|v| v.name.as_str())
            .chain(self.initializers.keys().map(String::as_str))
            .collect();
        for n in &self.nodes {
            defined.extend(n.outputs.iter().map(String::as_str));
        }
        let mut free = Vec::new();
        for n in &self.nodes {
            for i in n.inputs.iter().filter(|s| !s.is_empty()) {
                if !defined.contains(i.as_str()) {
                    free.push(i.clone());
                }
            }
            for g in subgraphs(n) {
                free.extend(
                    g.free_values()
                        .into_iter()
                        .filter(|v| !defined.contains(v.as_str())),
                );
            }
        }
        for o in &self.outputs {
            if !defined.contains(o.name.as_str()) {
                free.push(o.name.clone());
            }
        }
        free.sort();
        free.dedup();
        free
    }

    /// Replaces node `idx` with `nodes` (in place, keeping order around it).
    pub fn replace_node(&mut self, idx: usize, nodes: Vec<Node>) {
        self.nodes.splice(idx..=idx, nodes);
    }

    /// Inserts `node` on the edge leaving `value`: the node must read `value` and write
    /// `node.outputs[0]`; every other reader of `value` (and any graph output of that name)
    /// is rewired to read the new output. Returns the new node's index.
    pub fn insert_after_value(&mut self, value: &str, node: Node) -> Result<usize> {
        let Some(new_out) = node.outputs.first().cloned() else {
            bail!(Invalid, "{} has no output to rewire to", node.label());
        };
        if !node.inputs.iter().any(|i| i == value) {
            bail!(Invalid, "{} does not read '{value}'", node.label());
        }
        for n in &mut self.nodes {
            for i in n.inputs.iter_mut().filter(|i| *i == value) {
                *i = new_out.clone();
            }
        }
        let renamed_output = self.outputs.iter().any(|o| o.name == value);
        if renamed_output {
            // Keep the graph's public output name: the new node writes it, the old value is renamed.
            let hidden = self.unique_name(&format!("{value}_pre"));
            for n in &mut self.nodes {
                for o in n.outputs.iter_mut().filter(|o| *o == value) {
                    *o = hidden.clone();
                }
                for i in n.inputs.iter_mut().filter(|i| **i == new_out) {
                    *i = value.to_string();
                }
            }
            let mut node = node;
            for i in node.inputs.iter_mut().filter(|i| *i == value) {
                *i = hidden.clone();
            }
            node.outputs[0] = value.to_string();
            let at = self.producer(&hidden).map(|p| p + 1).unwrap_or(0);
            self.nodes.insert(at, node);
            return Ok(at);
        }
        let at = self.producer(value).map(|p| p + 1).unwrap_or(0);
        self.nodes.insert(at, node);
        Ok(at)
    }

    /// Old files (IR < 4) also list initializers as graph inputs, which makes them overridable
    /// defaults. Every runtime treats them as constants; this makes the graph say so, so that
    /// passes see them as weights. Returns how many inputs were dropped.
    pub fn drop_initializer_inputs(&mut self) -> usize {
        let before = self.inputs.len();
        let inits = &self.initializers;
        self.inputs.retain(|v| !inits.contains_key(&v.name));
        before - self.inputs.len()
    }

    /// Whether any node carries a subgraph (If, Loop, Scan): passes that rename or remove
    /// values leave such graphs alone, since a body may read values by name.
    pub fn has_subgraphs(&self) -> bool {
        self.nodes.iter().any(|n| subgraphs(n).next().is_some())
    }

    /// Removes nodes whose outputs no graph output depends on, and initializers nothing reads.
    /// Returns how many nodes and initializers were removed.
    pub fn remove_dead(&mut self) -> (usize, usize) {
        let mut live: HashSet<String> = self.outputs.iter().map(|o| o.name.clone()).collect();
        let mut keep = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate().rev() {
            if n.outputs.iter().any(|o| live.contains(o)) {
                keep[i] = true;
                // An empty name is an absent optional input, not a value: it keeps nothing alive.
                live.extend(n.inputs.iter().filter(|x| !x.is_empty()).cloned());
                for g in subgraphs(n) {
                    live.extend(g.free_values());
                }
            }
        }
        let before = self.nodes.len();
        let mut it = keep.iter();
        self.nodes.retain(|_| *it.next().unwrap());
        let nodes_removed = before - self.nodes.len();
        // Old files (IR < 4) list initializers as inputs too; a dead one goes with its entry.
        let dead: HashSet<String> = self
            .initializers
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        self.inputs.retain(|v| !dead.contains(&v.name));
        let before = self.initializers.len();
        self.initializers.retain(|k, _| !dead.contains(k));
        // Types declared for values no live node reads would describe nothing (or a value of
        // the same name that a rewrite gave another type).
        self.value_info.retain(|v| live.contains(&v.name));
        (nodes_removed, before - self.initializers.len())
    }

    /// Declared type of a value (graph input/output or value_info), if any.
    pub fn value_info(&self, name: &str) -> Option<&ValueInfo> {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .chain(&self.value_info)
            .find(|v| v.name == name)
    }

    /// Number of scalar parameters held in floating-point initializers.
    pub fn param_count(&self) -> usize {
        self.initializers.values().map(|t| t.numel()).sum()
    }
}

/// The subgraphs held in a node's attributes (If branches, Loop/Scan bodies).
pub fn subgraphs(n: &Node) -> impl Iterator<Item = &Graph> {
    n.attrs.values().flat_map(|a| match a {
        Attr::Graph(g) => vec![g.as_ref()],
        Attr::Graphs(gs) => gs.iter().collect(),
        _ => vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> Graph {
        let mut g = Graph {
            inputs: vec![ValueInfo::new("x", DType::F32, vec![Dim::Fixed(2)])],
            outputs: vec![ValueInfo::new("z", DType::F32, vec![Dim::Fixed(2)])],
            ..Default::default()
        };
        g.nodes.push(Node::new("Neg", "b", &["y"], &["z"]));
        g.nodes.push(Node::new("Relu", "a", &["x"], &["y"]));
        g.nodes.push(Node::new("Relu", "dead", &["x"], &["unused"]));
        g
    }

    #[test]
    fn sorts_and_removes_dead_nodes() {
        let mut g = chain();
        g.sort().unwrap();
        assert_eq!(g.nodes[0].name, "a");
        assert_eq!(g.remove_dead(), (1, 0));
        assert_eq!(g.nodes.len(), 2);
        assert_eq!(g.consumers("y"), vec![1]);
        assert_eq!(g.producer("z"), Some(1));
    }

    #[test]
    fn detects_cycles_and_dangling_inputs() {
        let mut g = chain();
        g.nodes[1].inputs[0] = "z".into();
        let e = g.topo_order().unwrap_err().to_string();
        assert!(e.contains("cycle"), "{e}");
        let mut g = chain();
        g.nodes[0].inputs[0] = "nowhere".into();
        let e = g.topo_order().unwrap_err().to_string();
        assert!(e.contains("'nowhere'"), "{e}");
    }

    #[test]
    fn inserts_on_an_edge_and_keeps_output_names() {
        let mut g = chain();
        g.sort().unwrap();
        g.insert_after_value("y", Node::new("Abs", "q", &["y"], &["y_q"]))
            .unwrap();
        assert_eq!(g.nodes[2].inputs, vec!["y_q"]);
        g.insert_after_value("z", Node::new("Abs", "o", &["z"], &["z_o"]))
            .unwrap();
        g.topo_order().unwrap();
        let last = g.producer("z").unwrap();
        assert_eq!(g.nodes[last].name, "o");
    }
}
