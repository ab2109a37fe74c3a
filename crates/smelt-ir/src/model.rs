use crate::Graph;

#[derive(Clone, Debug, PartialEq)]
pub struct OpsetImport {
    pub domain: String,
    pub version: i64,
}

/// A whole model: the graph plus the metadata a round trip must preserve.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub ir_version: i64,
    pub opsets: Vec<OpsetImport>,
    pub producer_name: String,
    pub producer_version: String,
    pub domain: String,
    pub model_version: i64,
    pub doc_string: String,
    pub metadata: Vec<(String, String)>,
    pub graph: Graph,
}

impl Model {
    /// A model of `graph` importing the default domain at `opset` (IR version 8, what
    /// onnxruntime reads for every opset smelt writes): how passes and tests build one.
    pub fn new(graph: Graph, opset: i64) -> Model {
        Model {
            ir_version: 8,
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: opset,
            }],
            graph,
            ..Default::default()
        }
    }

    /// The opset version imported for `domain` ("" and "ai.onnx" are the same domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let norm = |d: &str| if d == "ai.onnx" { "" } else { d }.to_string();
        let want = norm(domain);
        self.opsets
            .iter()
            .find(|o| norm(&o.domain) == want)
            .map(|o| o.version)
    }

    /// The default-domain opset, which op semantics depend on.
    pub fn onnx_opset(&self) -> i64 {
        self.opset("").unwrap_or(1)
    }
}
