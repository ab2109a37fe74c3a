//! The report of a run: a JSON manifest, a Markdown summary and a self-contained HTML page
//! whose charts are inline SVG (drawn by plotters, no fonts or external assets needed).

use crate::ablation::LayerAblation;
use crate::measure::Measure;
use crate::pipeline::StageRecord;
use crate::recipe::Recipe;
use crate::search::{Budget, Candidate};
use plotters::prelude::*;
use serde::Serialize;
use smelt_tensor::{Error, Result};
use std::path::Path;

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub batch: usize,
    pub before_ms: f64,
    pub after_ms: f64,
    /// before / after: above 1 is faster.
    pub speedup: f64,
    /// The same in onnxruntime, when it was timed (`smelt compress --ort-python`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ort_ms: Option<(f64, f64)>,
}

/// One compute layer of the result.
#[derive(Clone, Debug, Serialize)]
pub struct LayerRow {
    pub layer: String,
    pub op: String,
    pub macs: u64,
    pub params: u64,
    /// Fraction of exact zeros in the layer's weights.
    pub sparsity: f64,
    /// Bits of the stored weight (None: float).
    pub bits: Option<u32>,
    pub sqnr_db: Option<f64>,
    /// Metric lost with only this layer at the low precision (mixed-precision search).
    pub low_bits_cost: Option<f64>,
    /// A fallback's reason, or why the layer got its bits.
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub recipe: Recipe,
    pub before: Measure,
    pub stages: Vec<StageRecord>,
    pub after: Measure,
    /// Measured side by side in smelt's engine, on this machine.
    pub latency: Vec<Latency>,
    /// Gains that did not happen: a smaller model that is not faster, accuracy lost; and
    /// importance rankings that did no better than random.
    pub warnings: Vec<String>,
    /// Channel importance of the original model, checked by ablation.
    pub ablation: Vec<LayerAblation>,
    /// With a budget: what it was, and every candidate tried.
    pub budget: Option<Budget>,
    pub candidates: Vec<Candidate>,
    /// Per-layer bits of a mixed-precision result, with the reasons.
    pub precision: Vec<smelt_quant::mixed::LayerChoice>,
    /// Every compute layer of the result: bits, sparsity, quantization error, sensitivity.
    pub layers: Vec<LayerRow>,
    /// Set while a search is still running or after it was interrupted: the report covers
    /// the candidates decided so far.
    pub partial: Option<String>,
}

impl Report {
    pub fn new(
        model: String,
        recipe: Recipe,
        before: Measure,
        stages: Vec<StageRecord>,
        latency: Vec<Latency>,
    ) -> Report {
        let after = stages.last().map_or(before.clone(), |s| s.after.clone());
        let mut warnings = Vec::new();
        for l in &latency {
            if l.speedup < 1.0 {
                warnings.push(format!(
                    "not faster: at batch {} the result takes {:.3} ms, the original {:.3} ms \
                     ({:.2}x) in smelt's engine",
                    l.batch, l.after_ms, l.before_ms, l.speedup
                ));
            }
            if let Some((b, a)) = l.ort_ms.filter(|(b, a)| a > b) {
                warnings.push(format!(
                    "not faster in onnxruntime: at batch {} the result takes {a:.3} ms, the \
                     original {b:.3} ms ({:.2}x)",
                    l.batch,
                    b / a
                ));
            }
        }
        if after.bytes >= before.bytes {
            warnings.push("not smaller: the file did not shrink".into());
        }
        if let (Some(a), Some(b)) = (after.accuracy, before.accuracy) {
            if a < b - 0.01 {
                warnings.push(format!(
                    "accuracy fell by {:.2} points ({b:.4} -> {a:.4})",
                    100.0 * (b - a)
                ));
            }
        }
        Report {
            model,
            recipe,
            before,
            stages,
            after,
            latency,
            warnings,
            ablation: vec![],
            budget: None,
            candidates: vec![],
            precision: vec![],
            layers: vec![],
            partial: None,
        }
    }

    /// Marks the report as covering only part of a run, first among its warnings.
    pub fn partial(mut self, why: String) -> Report {
        self.warnings.insert(0, format!("partial report: {why}"));
        self.partial = Some(why);
        self
    }

    pub fn with_search(mut self, budget: Budget, candidates: Vec<Candidate>) -> Report {
        self.budget = Some(budget);
        self.candidates = candidates;
        self
    }

    /// The per-layer table of the result `model`, from its quantization manifest and any
    /// per-layer precision choice.
    pub fn with_layers(
        mut self,
        model: &smelt_ir::Model,
        manifest: Option<&smelt_quant::Manifest>,
    ) -> Result<Report> {
        // The reference session keeps every node as written, so rows carry the file's ops.
        let s = smelt_engine::Session::reference(model.clone())?;
        let shapes = smelt_engine::analysis::infer_shapes(&s, &Default::default())?;
        let stats = smelt_engine::analysis::model_stats(s.model(), &shapes);
        // model_stats lists the nodes in graph order, one each.
        for (node, n) in s.model().graph.nodes.iter().zip(&stats.nodes) {
            if !(n.macs > 0 || (n.op_type == "Gather" && n.params > 0)) {
                continue;
            }
            let label = node.label();
            let weight = manifest.and_then(|m| m.weights().find(|t| t.node == label));
            let choice = self.precision.iter().find(|c| c.node == label);
            let fallback = manifest.and_then(|m| m.fallbacks.iter().find(|f| f.node == label));
            self.layers.push(LayerRow {
                layer: label.clone(),
                op: n.op_type.clone(),
                macs: n.macs,
                params: n.params,
                sparsity: n.sparsity,
                bits: weight.map(|t| t.bits),
                sqnr_db: weight.and_then(|t| t.sqnr_db),
                low_bits_cost: choice.map(|c| c.low_drop),
                note: match (fallback, choice, weight) {
                    (Some(f), _, _) => format!("left in float: {}", f.reason),
                    (None, Some(c), _) => c.reason.clone(),
                    (None, None, None) if manifest.is_some() => "float".into(),
                    _ => String::new(),
                },
            });
        }
        Ok(self)
    }

    pub fn with_precision(mut self, layers: Vec<smelt_quant::mixed::LayerChoice>) -> Report {
        self.precision = layers;
        self
    }

    fn layers_html(&self) -> String {
        if self.layers.is_empty() {
            return String::new();
        }
        let rows: String = self
            .layers
            .iter()
            .map(|l| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}%</td><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>\n",
                    esc(&l.layer),
                    l.macs,
                    l.params,
                    100.0 * l.sparsity,
                    l.bits.map_or("float".into(), |b| b.to_string()),
                    l.sqnr_db.map_or("-".into(), |d| format!("{d:.1}")),
                    l.low_bits_cost.map_or("-".into(), |c| format!("{c:.5}")),
                    esc(&l.note)
                )
            })
            .collect();
        format!(
            "<h2>Layers of the result</h2>\n<table><tr><th>layer</th><th>MACs</th><th>params</th>\
             <th>sparsity</th><th>weight bits</th><th>weight SQNR (dB)</th><th>cost at low bits \
             alone</th><th>note</th></tr>\n{rows}</table>\n"
        )
    }

    pub fn with_warnings(mut self, warnings: Vec<String>) -> Report {
        self.warnings.extend(warnings);
        self
    }

    pub fn with_ablation(mut self, ablation: Vec<LayerAblation>) -> Report {
        for a in &ablation {
            if !a.better_than_random {
                self.warnings.push(format!(
                    "the {} ranking of {}'s channels does no better than random under ablation",
                    a.criterion, a.layer
                ));
            }
        }
        self.ablation = ablation;
        self
    }

    /// Rows of the before/after table: (metric, before, after, change).
    pub fn table(&self) -> Vec<[String; 4]> {
        let (b, a) = (&self.before, &self.after);
        let ratio = |x: f64, y: f64| {
            if x > 0.0 {
                format!("x{:.2}", y / x)
            } else {
                "-".into()
            }
        };
        let mut rows = Vec::new();
        if let (Some(x), Some(y)) = (b.accuracy, a.accuracy) {
            rows.push([
                "accuracy".into(),
                format!("{x:.4}"),
                format!("{y:.4}"),
                format!("{:+.2} pt", 100.0 * (y - x)),
            ]);
        }
        let int = |label: &str, x: u64, y: u64| {
            [
                label.to_string(),
                x.to_string(),
                y.to_string(),
                ratio(x as f64, y as f64),
            ]
        };
        if let Some(y) = a.fidelity {
            rows.push([
                "cosine to the original".into(),
                "1".into(),
                format!("{y:.5}"),
                format!("{:+.5}", y - 1.0),
            ]);
        }
        rows.push(int("params", b.params, a.params));
        rows.push(int("non-zero params", b.nonzero, a.nonzero));
        rows.push(int("FLOPs (batch 1)", b.flops, a.flops));
        rows.push(int("file bytes", b.bytes, a.bytes));
        rows.push(int(
            "peak memory, batch 1 (bytes)",
            b.peak_bytes,
            a.peak_bytes,
        ));
        for l in &self.latency {
            rows.push([
                format!("latency, batch {} (ms)", l.batch),
                format!("{:.3}", l.before_ms),
                format!("{:.3}", l.after_ms),
                format!("{:.2}x faster", l.speedup),
            ]);
        }
        for l in &self.latency {
            if let Some((b, a)) = l.ort_ms {
                rows.push([
                    format!("onnxruntime latency, batch {} (ms)", l.batch),
                    format!("{b:.3}"),
                    format!("{a:.3}"),
                    format!("{:.2}x faster", b / a.max(1e-12)),
                ]);
            }
        }
        rows
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# smelt report: {}\n\nRecipe `{}`: {}\n\n| metric | before | after | change |\n|---|---|---|---|\n",
            self.model,
            self.recipe.name,
            self.recipe.description
        );
        for r in self.table() {
            s += &format!("| {} | {} | {} | {} |\n", r[0], r[1], r[2], r[3]);
        }
        s += "\n## Stages\n\n";
        for (i, st) in self.stages.iter().enumerate() {
            s += &format!(
                "{}. **{}** ({:.1} s): {}{}\n",
                i + 1,
                st.kind,
                st.seconds,
                st.summary,
                st.after
                    .accuracy
                    .map(|a| format!("; accuracy {a:.4}"))
                    .or(st.after.fidelity.map(|f| format!("; cosine {f:.5}")))
                    .unwrap_or_default()
            );
        }
        if !self.candidates.is_empty() {
            s += "\n## Candidates (budget search)\n\n| recipe | accuracy (or cosine) | bytes | latency (ms, original / candidate) | verdict |\n|---|---|---|---|---|\n";
            for c in &self.candidates {
                s += &format!(
                    "| {} | {} | {} | {} | {} |\n",
                    c.recipe,
                    c.after
                        .as_ref()
                        .and_then(|m| m.score())
                        .map(|a| format!("{a:.4}"))
                        .unwrap_or("-".into()),
                    c.after
                        .as_ref()
                        .map(|m| m.bytes.to_string())
                        .unwrap_or("-".into()),
                    c.latency_ms
                        .map(|(b, a)| format!("{b:.3} / {a:.3}"))
                        .unwrap_or("-".into()),
                    c.verdict
                );
            }
        }
        if !self.layers.is_empty() {
            s += "\n## Layers of the result\n\n| layer | MACs | params | sparsity | weight bits | weight SQNR (dB) | note |\n|---|---|---|---|---|---|---|\n";
            for l in &self.layers {
                s += &format!(
                    "| {} | {} | {} | {:.1}% | {} | {} | {} |\n",
                    l.layer,
                    l.macs,
                    l.params,
                    100.0 * l.sparsity,
                    l.bits.map_or("float".into(), |b| b.to_string()),
                    l.sqnr_db.map_or("-".into(), |d| format!("{d:.1}")),
                    l.note
                );
            }
        }
        if !self.precision.is_empty() {
            s += "\n## Bits per layer\n\n| layer | op | bits | cost of the low precision alone | bytes it saves | why |\n|---|---|---|---|---|---|\n";
            for l in &self.precision {
                s += &format!(
                    "| {} | {} | {} | {:.5} | {} | {} |\n",
                    l.node, l.op, l.bits, l.low_drop, l.bytes_saved, l.reason
                );
            }
        }
        if !self.ablation.is_empty() {
            s += "\n## Channel importance, checked by ablation\n\n\
                  | layer | channels | most important (score) | least important | accuracy after removing k: most / random / least important first |\n|---|---|---|---|---|\n";
            for a in &self.ablation {
                let (top, bottom) = a.ends(3);
                let ends: Vec<String> = (1..a.curves[0].points.len())
                    .map(|i| {
                        format!(
                            "k={}: {:.3} / {:.3} / {:.3}",
                            a.curves[0].points[i].0,
                            a.curves[0].points[i].1,
                            a.curves[1].points[i].1,
                            a.curves[2].points[i].1
                        )
                    })
                    .collect();
                s += &format!(
                    "| {} | {} | {} | {} | {} |\n",
                    a.layer,
                    a.channels,
                    top.join(", "),
                    bottom.join(", "),
                    ends.join("; ")
                );
            }
        }
        if !self.warnings.is_empty() {
            s += "\n## Warnings\n\n";
            for w in &self.warnings {
                s += &format!("- {w}\n");
            }
        }
        s
    }

    /// Writes `report.json`, `summary.md` and `report.html` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Input(format!("cannot create {}: {e}", dir.display())))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        smelt_onnx::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        smelt_onnx::write_atomic(&dir.join("summary.md"), self.markdown().as_bytes())?;
        smelt_onnx::write_atomic(&dir.join("report.html"), self.html()?.as_bytes())?;
        Ok(())
    }

    fn html(&self) -> Result<String> {
        let mut rows = String::new();
        for r in self.table() {
            rows += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(&r[0]),
                esc(&r[1]),
                esc(&r[2]),
                esc(&r[3])
            );
        }
        let mut stages = String::new();
        for st in &self.stages {
            stages += &format!(
                "<li><b>{}</b> ({:.1} s): {}</li>\n",
                esc(st.kind),
                st.seconds,
                esc(&st.summary)
            );
        }
        let warnings: String = self
            .warnings
            .iter()
            .map(|w| format!("<li class=\"warn\">{}</li>\n", esc(w)))
            .collect();
        Ok(format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>smelt report: {model}</title>\n\
             <style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}\
             table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:right}}\
             td:first-child{{text-align:left}}.warn{{color:#b00}}figure{{display:inline-block;margin:1em}}</style>\n\
             </head><body>\n<h1>smelt report: {model}</h1>\n<p>Recipe <code>{recipe}</code>: {desc}</p>\n\
             <table><tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>\n{rows}</table>\n\
             <h2>Stages</h2>\n<ol>\n{stages}</ol>\n<h2>Warnings</h2>\n<ul>\n{warnings}</ul>\n\
             <h2>Trade-off</h2>\n<figure>{size_chart}<figcaption>accuracy vs file size, after each stage</figcaption></figure>\n\
             <figure>{flops_chart}<figcaption>accuracy vs FLOPs, after each stage</figcaption></figure>\n\
             {candidates}{layers}{precision}{ablation}</body></html>\n",
            model = esc(&self.model),
            recipe = esc(&self.recipe.name),
            desc = esc(&self.recipe.description),
            size_chart = self.chart("file size (KiB)", |m| m.bytes as f64 / 1024.0)?,
            flops_chart = self.chart("MFLOPs", |m| m.flops as f64 / 1e6)?,
            ablation = self.ablation_html()?,
            candidates = self.candidates_html()?,
            precision = self.precision_html(),
            layers = self.layers_html(),
        ))
    }

    fn precision_html(&self) -> String {
        if self.precision.is_empty() {
            return String::new();
        }
        let rows: String = self
            .precision
            .iter()
            .map(|l| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.5}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>\n",
                    esc(&l.node),
                    esc(&l.op),
                    l.bits,
                    l.low_drop,
                    l.bytes_saved,
                    esc(&l.reason)
                )
            })
            .collect();
        format!(
            "<h2>Bits per layer</h2>\n<p>Each layer's cost is the metric lost when only it takes \
             the low precision; layers go low cheapest per byte first while the budget holds.</p>\n\
             <table><tr><th>layer</th><th>op</th><th>bits</th><th>cost alone</th><th>bytes saved</th>\
             <th>why</th></tr>\n{rows}</table>\n"
        )
    }

    fn candidates_html(&self) -> Result<String> {
        if self.candidates.is_empty() {
            return Ok(String::new());
        }
        let mut rows = String::new();
        for c in &self.candidates {
            let m = c.after.as_ref();
            rows += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td></tr>\n",
                esc(&c.recipe),
                m.and_then(|m| m.score())
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or("-".into()),
                m.map(|m| m.bytes.to_string()).unwrap_or("-".into()),
                c.latency_ms
                    .map(|(b, a)| format!("{b:.3} / {a:.3}"))
                    .unwrap_or("-".into()),
                if c.accepted { "" } else { " class=\"warn\"" },
                esc(&c.verdict)
            );
        }
        Ok(format!(
            "<h2>Candidates (budget search)</h2>\n<table><tr><th>recipe</th><th>accuracy (or cosine)</th>\
             <th>bytes</th><th>latency ms (original / candidate)</th><th>verdict</th></tr>\n{rows}</table>\n\
             <figure>{}<figcaption>accuracy vs file size of every candidate (green: meets the budget)</figcaption></figure>\n\
             <figure>{}<figcaption>accuracy vs latency of every candidate, smelt's engine, batch {} (green: meets the budget)</figcaption></figure>\n",
            candidates_chart(
                (Some(self.before.bytes as f64 / 1024.0), &self.before),
                &self.candidates,
                "file size (KiB)",
                |c| c.after.as_ref().map(|m| m.bytes as f64 / 1024.0)
            )?,
            candidates_chart(
                (self.candidates.iter().find_map(|c| c.latency_ms.map(|l| l.0)), &self.before),
                &self.candidates,
                "latency (ms)",
                |c| c.latency_ms.map(|l| l.1)
            )?,
            self.budget.as_ref().map_or(1, |b| b.batch.max(1))
        ))
    }

    fn ablation_html(&self) -> Result<String> {
        if self.ablation.is_empty() {
            return Ok(String::new());
        }
        let mut s = String::from(
            "<h2>Channel importance, checked by ablation</h2>\n<p>Accuracy after removing the k \
             most important, k random and k least important channels of each layer (by the \
             original model's scores; random is the mean of several draws, the bars their range). \
             A true ranking keeps the green curve high and the red one low. Scores in brackets: \
             the criterion's, or for greedy the rise in training loss when the channel was \
             removed in its turn.</p>\n",
        );
        for a in &self.ablation {
            let (top, low) = a.ends(5);
            s += &format!(
                "<figure>{}<figcaption>{} ({} channels, {}){}<br>most important: {}<br>least important: {}</figcaption></figure>\n",
                ablation_chart(a)?,
                esc(&a.layer),
                a.channels,
                esc(&a.criterion),
                if a.better_than_random { "" } else { " <span class=\"warn\">no better than random</span>" },
                esc(&top.join(", ")),
                esc(&low.join(", "))
            );
        }
        Ok(s)
    }

    /// Accuracy against `x(measure)` for the original and after each stage, as inline SVG.
    fn chart(&self, x_label: &str, x: impl Fn(&Measure) -> f64) -> Result<String> {
        let points: Vec<(f64, f64, String)> = std::iter::once(("original", &self.before))
            .chain(self.stages.iter().map(|s| (s.kind, &s.after)))
            .filter_map(|(k, m)| m.score().map(|a| (x(m), a, k.to_string())))
            .collect();
        let mut svg = String::new();
        if points.is_empty() {
            return Ok("<p>(no validation data: no accuracy to plot)</p>".into());
        }
        let fail = |e: String| Error::Invalid(format!("chart: {e}"));
        {
            let root = SVGBackend::with_string(&mut svg, (480, 320)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
            let (xmax, ymin) = points
                .iter()
                .fold((0f64, 1f64), |(a, b), p| (a.max(p.0), b.min(p.1)));
            let mut chart = ChartBuilder::on(&root)
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(0.0..xmax * 1.1 + 1e-9, (ymin - 0.02).max(0.0)..1.0)
                .map_err(|e| fail(e.to_string()))?;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc("accuracy")
                .draw()
                .map_err(|e| fail(e.to_string()))?;
            chart
                .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), &BLUE))
                .map_err(|e| fail(e.to_string()))?;
            chart
                .draw_series(points.iter().map(|p| {
                    EmptyElement::at((p.0, p.1))
                        + Circle::new((0, 0), 4, BLUE.filled())
                        + Text::new(p.2.clone(), (6, -14), ("sans-serif", 12))
                }))
                .map_err(|e| fail(e.to_string()))?;
            root.present().map_err(|e| fail(e.to_string()))?;
        }
        Ok(svg)
    }
}

/// Accuracy against file size for the original and every measured candidate, as inline SVG.
/// Accuracy (or fidelity) of the original and of every candidate against `x`, as inline SVG.
fn candidates_chart(
    before: (Option<f64>, &Measure),
    cands: &[Candidate],
    x_label: &str,
    x: impl Fn(&Candidate) -> Option<f64>,
) -> Result<String> {
    let fail = |e: String| Error::Invalid(format!("chart: {e}"));
    let original = before
        .0
        .zip(before.1.score())
        .map(|(bx, a)| (bx, a, "original".to_string(), BLUE));
    let pts: Vec<(f64, f64, String, RGBColor)> = original
        .into_iter()
        .chain(cands.iter().filter_map(|c| {
            Some((
                x(c)?,
                c.after.as_ref()?.score()?,
                c.recipe.clone(),
                if c.accepted { GREEN } else { RED },
            ))
        }))
        .collect();
    if pts.is_empty() {
        return Ok(String::new());
    }
    let (xmax, ymin) = pts
        .iter()
        .fold((0f64, 1f64), |(a, b), p| (a.max(p.0), b.min(p.1)));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..xmax * 1.15 + 1e-9, (ymin - 0.02).max(0.0)..1.0)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("accuracy")
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(pts.iter().map(|p| {
                EmptyElement::at((p.0, p.1))
                    + Circle::new((0, 0), 4, p.3.filled())
                    + Text::new(p.2.clone(), (6, -14), ("sans-serif", 11))
            }))
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    Ok(svg)
}

/// Accuracy against channels removed, one line per removal order, as inline SVG.
fn ablation_chart(a: &LayerAblation) -> Result<String> {
    let fail = |e: String| Error::Invalid(format!("chart: {e}"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (420, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let kmax = a
            .curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.0))
            .max()
            .unwrap_or(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            // A little room on the right, so the last range bar is not drawn on the frame.
            .build_cartesian_2d(0.0..kmax * 1.04, 0.0..1.0)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("channels removed")
            .y_desc("accuracy")
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (c, colour) in a.curves.iter().zip([RED, BLACK, GREEN]) {
            if let Some(spread) = &c.spread {
                // The random draws' range at each point, as a bar.
                chart
                    .draw_series(c.points.iter().zip(spread).map(|(p, &(lo, hi))| {
                        PathElement::new(
                            vec![(p.0 as f64, lo), (p.0 as f64, hi)],
                            colour.mix(0.35).stroke_width(5),
                        )
                    }))
                    .map_err(|e| fail(e.to_string()))?;
            }
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().map(|p| (p.0 as f64, p.1)),
                    colour.stroke_width(2),
                ))
                .map_err(|e| fail(e.to_string()))?
                .label(c.order)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    Ok(svg)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
