//! Feature matching pulls a student's intermediate values toward its teacher's.

use smelt_engine::{RunOptions, Session};
use smelt_tensor::Tensor;
use smelt_train::{finetune, Distill, Options, Samples};
use std::path::PathBuf;

fn assets() -> PathBuf {
    std::env::var_os("SMELT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/smelt/assets")
        })
}

/// Normalized squared distance between the two models' values of `name` on `x`.
fn gap(a: &smelt_ir::Model, b: &smelt_ir::Model, name: &str, x: &Tensor) -> f64 {
    let value = |m: &smelt_ir::Model| {
        let m = smelt_train::prepare(m.clone()).unwrap();
        let input = smelt_train::input_name(&m).unwrap();
        let s = Session::reference(m).unwrap();
        let opts = RunOptions {
            capture: vec![name.to_string()],
            ..Default::default()
        };
        let (_, v) = s.run_with(&[(input.as_str(), x.clone())], &opts).unwrap();
        v[name].as_slice::<f32>().unwrap().to_vec()
    };
    let (p, q) = (value(a), value(b));
    let d: f64 = p
        .iter()
        .zip(&q)
        .map(|(u, v)| ((u - v) as f64).powi(2))
        .sum();
    d / q.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
}

#[test]
fn feature_matching_closes_the_gap_to_the_teacher() {
    let path = assets().join("mnist-8/model.onnx");
    assert!(path.exists(), "assets missing: run scripts/fetch-assets.sh");
    let teacher = smelt_onnx::load(&path).unwrap();
    // The student: the teacher with its first convolution's kernels scaled down.
    let mut student = teacher.clone();
    let w = student.graph.initializers.get_mut("Parameter5").unwrap();
    w.as_mut_slice::<f32>()
        .unwrap()
        .iter_mut()
        .for_each(|v| *v *= 0.5);
    // Any images will do: with alpha 1 the labels carry no weight.
    let n = 256;
    let mut s = 7u64;
    let px: Vec<f32> = (0..n * 784)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) % 256) as f32
        })
        .collect();
    let x = Tensor::from_vec(vec![n, 1, 28, 28], px).unwrap();
    let y = vec![0i64; n];
    let feature = "Convolution28_Output_0";
    let before = gap(&student, &teacher, feature, &x);
    let data = Samples { x: &x, y: &y };
    let train = |feature_weight: f32| {
        let opts = Options {
            epochs: 10,
            batch: 32,
            optimizer: smelt_train::optim::Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            lr: 3e-3,
            // No logit loss to speak of: the label loss is flattened, the KL term off.
            loss_temperature: 1e6,
            distill: Some(Distill {
                feature_weight,
                features: vec![feature.to_string()],
                ..Distill::logits(teacher.clone(), 1.0, 0.0)
            }),
            ..Default::default()
        };
        let trained = finetune(student.clone(), &data, None, &opts, |_| {}).unwrap();
        gap(&trained.model, &teacher, feature, &x)
    };
    let (with, without) = (train(1.0), train(0.0));
    eprintln!("feature gap {before:.4} -> {with:.4} (without feature matching: {without:.4})");
    assert!(before > 0.1, "{before}");
    assert!(with < 0.4 * before, "{before} -> {with}");
    assert!(with < without, "{with} vs {without}");

    // A name the teacher lacks is refused.
    let opts = Options {
        distill: Some(Distill {
            feature_weight: 1.0,
            features: vec!["no_such_value".into()],
            ..Distill::logits(teacher.clone(), 1.0, 1.0)
        }),
        ..Default::default()
    };
    let err = finetune(teacher.clone(), &data, None, &opts, |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no_such_value"), "{err}");
}
