//! SVG charts: training curves from metrics.jsonl, the forget/utility trade-off, truth-ratio
//! histograms (also written next to a tofu report.md), NaN handling, and `unlearn plot` on the
//! output directory of a real (tiny) run.
mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use unlearn::eval::plots::{
    histogram_svg, plot_run, read_metrics, tradeoff_keys, tradeoff_svg, training_curves_svg,
};
use unlearn::eval::{evaluate, write_outputs, DataArg, EvalRequest, Reference, Suite};
use unlearn::recipe::Recipe;
use unlearn::train::trainer::{run, RunOptions};

/// The numbers in an attribute value: `points="1,2 3,4"` or `x="5"`.
fn numbers_in(value: &str) -> Vec<&str> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A minimal well-formedness check of a standalone SVG: the root element with the SVG
/// namespace, balanced containers, every coordinate a finite number.
fn check_svg(svg: &str) {
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    assert!(svg.contains(r#"xmlns="http://www.w3.org/2000/svg""#));
    assert_eq!(svg.matches("<svg").count(), 1);
    assert_eq!(svg.matches("</svg>").count(), 1);
    assert!(svg.trim_end().ends_with("</svg>"));
    for tag in ["g", "text", "title"] {
        assert_eq!(
            svg.matches(&format!("<{tag}>")).count() + svg.matches(&format!("<{tag} ")).count(),
            svg.matches(&format!("</{tag}>")).count(),
            "unbalanced <{tag}>"
        );
    }
    for attr in [
        " x=\"",
        " y=\"",
        " x1=\"",
        " y1=\"",
        " x2=\"",
        " y2=\"",
        " cx=\"",
        " cy=\"",
        " r=\"",
        " width=\"",
        " height=\"",
        " points=\"",
    ] {
        for (i, _) in svg.match_indices(attr) {
            let rest = &svg[i + attr.len()..];
            let value = &rest[..rest.find('"').unwrap()];
            for n in numbers_in(value) {
                let v: f64 = n
                    .parse()
                    .unwrap_or_else(|_| panic!("{attr}{value}: '{n}' is not a number"));
                assert!(v.is_finite(), "{attr}{value}");
            }
        }
    }
    assert!(!svg.contains("NaN") && !svg.contains("inf\""));
}

fn count(svg: &str, element: &str) -> usize {
    svg.matches(&format!("<{element} ")).count()
}

fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// A metrics.jsonl as the trainer writes it: per-step lines and eval lines.
fn hand_written_metrics(dir: &Path) -> PathBuf {
    let mut lines = vec![json!({"step": 0, "eval": {"forget_nll": 2.0, "retain_nll": 1.5}})];
    for step in 1..=6u64 {
        let s = step as f64;
        lines.push(json!({
            "step": step,
            "loss": 1.0 / s,
            "forget_loss": -2.0 - s,
            "retain_loss": 1.2 + 0.01 * s,
            "lambda": 0.1 * s,
            "grad_norm": 3.0,
            "lr": 1e-4,
            "note": "text is ignored",
        }));
        if step % 3 == 0 {
            lines.push(json!({"step": step, "eval": {"forget_nll": 2.0 + s, "retain_nll": 1.5 + 0.1 * s, "forget_quality": null}}));
        }
    }
    let p = dir.join("metrics.jsonl");
    write_lines(&p, &lines);
    p
}

#[test]
fn training_curves_from_a_hand_written_metrics_file() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run-a");
    std::fs::create_dir_all(&run_dir).unwrap();
    let p = hand_written_metrics(&run_dir);
    let svg = training_curves_svg(&p).unwrap();
    check_svg(&svg);
    // loss, forget_loss, retain_loss in the loss panel, lambda in the λ panel
    assert_eq!(count(&svg, "polyline"), 4, "{svg}");
    for s in ["loss", "forget_loss", "retain_loss", "lambda"] {
        assert!(svg.contains(&format!("<title>{s}</title>")), "{s}");
    }
    assert!(!svg.contains("grad_norm") && !svg.contains(">lr<") && !svg.contains("note"));
    assert!(svg.contains("Training curves: run-a"));
    assert!(
        svg.contains(">step</text>") && svg.contains("loss / NLL") && svg.contains(">λ</text>")
    );
    assert!(svg.contains(r#"class="legend""#));
    // every polyline point of the loss series lies on a step: 6 points
    let loss = svg
        .split("<polyline")
        .find(|s| s.contains("<title>loss</title>"))
        .unwrap();
    let pts = loss.split("points=\"").nth(1).unwrap();
    assert_eq!(pts[..pts.find('"').unwrap()].split(' ').count(), 6);

    // without λ: one panel
    let p2 = tmp.path().join("m2.jsonl");
    write_lines(
        &p2,
        &[
            json!({"step": 1, "loss": 1.0}),
            json!({"step": 2, "loss": 0.5}),
        ],
    );
    let svg = training_curves_svg(&p2).unwrap();
    check_svg(&svg);
    assert_eq!(count(&svg, "polyline"), 1);
    assert!(!svg.contains(">λ</text>"));

    let log = read_metrics(&p).unwrap();
    assert_eq!((log.steps.len(), log.evals.len()), (6, 3));
    assert_eq!(
        tradeoff_keys(&log.evals),
        Some(("forget_nll".into(), "retain_nll".into()))
    );
}

#[test]
fn nan_and_bad_lines() {
    let tmp = tempfile::tempdir().unwrap();
    // null (serde's NaN), a Python NaN literal and Infinity: skipped points; a series with no
    // finite value is not drawn
    let p = tmp.path().join("metrics.jsonl");
    std::fs::write(
        &p,
        "{\"step\": 1, \"loss\": 1.0, \"forget_nll\": null, \"lambda\": NaN}\n\
         {\"step\": 2, \"loss\": NaN, \"forget_nll\": null, \"lambda\": Infinity}\n\
         {\"step\": 3, \"loss\": 0.5, \"forget_nll\": null, \"lambda\": -Infinity}\n",
    )
    .unwrap();
    let svg = training_curves_svg(&p).unwrap();
    check_svg(&svg);
    assert_eq!(count(&svg, "polyline"), 1, "{svg}");
    let pts = svg.split("points=\"").nth(1).unwrap();
    assert_eq!(pts[..pts.find('"').unwrap()].split(' ').count(), 2);

    // a broken line in the middle is an error naming it; a partial last line is skipped
    std::fs::write(
        &p,
        "{\"step\": 1, \"loss\": 1.0}\n{\"step\": 2, \"lo\n{\"step\": 3, \"loss\": 1.0}\n",
    )
    .unwrap();
    let e = training_curves_svg(&p).unwrap_err().to_string();
    assert!(e.contains("metrics.jsonl") && e.contains("line 2"), "{e}");
    std::fs::write(&p, "{\"step\": 1, \"loss\": 1.0}\n{\"step\": 2, \"lo").unwrap();
    let log = read_metrics(&p).unwrap();
    assert_eq!(log.steps.len(), 1);
    assert!(log.notes[0].contains("last line 2"));
    // no per-step line; a missing file
    std::fs::write(&p, "{\"step\": 0, \"eval\": {\"forget_nll\": 1.0}}\n").unwrap();
    assert!(training_curves_svg(&p)
        .unwrap_err()
        .to_string()
        .contains("no per-step lines"));
    let e = training_curves_svg(&tmp.path().join("none.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("none.jsonl"), "{e}");

    // trade-off: the NaN and infinite points are skipped
    let svg = tradeoff_svg(
        &[
            (0, 0.1, 0.9),
            (5, f64::NAN, 0.8),
            (10, 0.4, f64::INFINITY),
            (15, 0.6, 0.7),
        ],
        ("forget metric: forget_quality", "utility: model_utility"),
    );
    check_svg(&svg);
    assert_eq!(count(&svg, "circle"), 2);
    assert_eq!(count(&svg, "polyline"), 1);
    assert!(svg.contains("step 0") && svg.contains("step 15") && !svg.contains("step 5<"));
    assert!(
        svg.contains("forget metric: forget_quality") && svg.contains("utility: model_utility")
    );
    // nothing finite: an empty chart, still valid
    let svg = tradeoff_svg(&[(1, f64::NAN, 1.0)], ("x", "y"));
    check_svg(&svg);
    assert_eq!((count(&svg, "circle"), count(&svg, "polyline")), (0, 0));
    // one point: a circle and no line
    let svg = tradeoff_svg(&[(3, 1.0, 1.0)], ("x", "y"));
    check_svg(&svg);
    assert_eq!((count(&svg, "circle"), count(&svg, "polyline")), (1, 0));

    // histograms: NaN/inf skipped and counted out of the legend's n
    let svg = histogram_svg(
        &[0.1, 0.2, f64::NAN, 0.25, 0.9, f64::INFINITY],
        &[0.5, 0.6, f64::NEG_INFINITY, 0.7],
        "Truth ratios",
    );
    check_svg(&svg);
    assert_eq!(count(&svg, "polyline"), 2);
    assert_eq!(count(&svg, "polygon"), 2);
    assert!(svg.contains("model (n = 4)") && svg.contains("retain model (n = 3)"));
    assert!(
        svg.contains("Truth ratios")
            && svg.contains(">items</text>")
            && svg.contains(">value</text>")
    );
    let svg = histogram_svg(&[1.0, 1.0, 1.0], &[], "one value");
    check_svg(&svg);
    assert_eq!(count(&svg, "polyline"), 1);
    let svg = histogram_svg(&[f64::NAN], &[], "nothing");
    check_svg(&svg);
    assert_eq!(count(&svg, "polyline"), 0);
    assert!(svg.contains("no finite values"));
    // text is escaped
    let svg = histogram_svg(&[1.0], &[2.0], "a < b & \"c\"");
    check_svg(&svg);
    assert!(svg.contains("a &lt; b &amp; &quot;c&quot;"));
}

#[test]
fn plot_run_on_a_hand_written_directory() {
    let tmp = tempfile::tempdir().unwrap();
    hand_written_metrics(tmp.path());
    let out = plot_run(tmp.path()).unwrap();
    let plots = tmp.path().join("plots");
    assert_eq!(
        out.written,
        vec![plots.join("training.svg"), plots.join("tradeoff.svg")]
    );
    let svg = std::fs::read_to_string(plots.join("tradeoff.svg")).unwrap();
    check_svg(&svg);
    // forget_quality is null everywhere: forget_nll against retain_nll, three evaluations
    assert_eq!(count(&svg, "circle"), 3);
    assert!(svg.contains("forget metric: forget_nll") && svg.contains("utility: retain_nll"));
    // eval lines without forget/retain metrics: only the training curves, and a note
    let p = tmp.path().join("metrics.jsonl");
    write_lines(
        &p,
        &[
            json!({"step": 1, "loss": 1.0}),
            json!({"step": 1, "eval": {"acc": 0.5}}),
        ],
    );
    std::fs::remove_dir_all(&plots).unwrap();
    let out = plot_run(tmp.path()).unwrap();
    assert_eq!(out.written, vec![plots.join("training.svg")]);
    assert!(out.notes[0].contains("no trade-off chart"));
    // not a run directory
    let e = plot_run(&tmp.path().join("plots")).unwrap_err().to_string();
    assert!(e.contains("no metrics.jsonl"), "{e}");
}

/// 6 TOFU rows, short enough for the fixture's 64 positions.
fn tofu_rows(prefix: &str) -> Vec<Value> {
    (0..6)
        .map(|i| {
            json!({
                "question": format!("Who is {prefix}{i}?"),
                "answer": format!("{prefix}{i} is a poet."),
                "paraphrased_answer": format!("A poet, {prefix}{i}."),
                "perturbed_answer": [format!("{prefix}{i} is a cook."), format!("{prefix}{i} was born.")],
            })
        })
        .collect()
}

#[test]
fn tofu_report_embeds_the_truth_ratio_histogram() {
    let tmp = tempfile::tempdir().unwrap();
    let forget = tmp.path().join("forget.jsonl");
    write_lines(&forget, &tofu_rows("F"));
    let mut req = EvalRequest {
        suite: Suite::resolve("tofu").unwrap(),
        data: vec![DataArg {
            split: "forget".into(),
            spec: Some(forget.display().to_string()),
        }],
        model: fixture("llama"),
        model_label: "llama".into(),
        adapter: Some(fixture("llama-lora")),
        reference: Some(Reference::Model {
            dir: fixture("llama"),
            label: "llama".into(),
        }),
        batch_size: Some(3),
        max_new_tokens: Some(4),
        limit: None,
        device: cpu(),
        progress: false,
        prompt_style: Default::default(),
    };
    let out = tmp.path().join("with_ref");
    write_outputs(&out, &evaluate(&req).unwrap()).unwrap();
    let svg = std::fs::read_to_string(out.join("truth_ratio_hist.svg")).unwrap();
    check_svg(&svg);
    assert_eq!(count(&svg, "polyline"), 2);
    assert!(svg.contains("model (n = 6)") && svg.contains("retain model (n = 6)"));
    assert!(svg.contains("log10 truth ratio"));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("](truth_ratio_hist.svg)"), "{report}");
    // the histogram's data are the per-item truth ratios in EVAL.json
    let log: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("EVAL.json")).unwrap()).unwrap();
    assert_eq!(
        log["reference"]["values"]["forget_truth_ratio"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.contains(".tmp"), "leftover {name}");
    }

    // without a reference: the model's histogram only
    req.reference = None;
    let out = tmp.path().join("alone");
    write_outputs(&out, &evaluate(&req).unwrap()).unwrap();
    let svg = std::fs::read_to_string(out.join("truth_ratio_hist.svg")).unwrap();
    check_svg(&svg);
    assert_eq!(count(&svg, "polyline"), 1);

    // a suite without truth ratios: no histogram, no link
    let req = EvalRequest {
        suite: Suite::resolve("perplexity").unwrap(),
        reference: None,
        adapter: None,
        ..req
    };
    let out = tmp.path().join("ppl");
    write_outputs(&out, &evaluate(&req).unwrap()).unwrap();
    assert!(!out.join("truth_ratio_hist.svg").exists());
    assert!(!std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("truth_ratio_hist"));
}

/// A tiny graddiff run on the llama fixture with a perplexity evaluation every 2 steps.
fn write_recipe(dir: &Path) -> PathBuf {
    let eval = format!(
        "[eval]\nsuite = \"perplexity\"\ndata = [\"forget={}\", \"retain={}\"]\nevery = 2\n",
        unlearn_data("forget.jsonl").display(),
        unlearn_data("retain.jsonl").display()
    );
    write_recipe_with(dir, "graddiff", "", "steps = 4", &eval)
}

#[test]
fn cli_plot_on_a_real_run() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = Recipe::load(&write_recipe(tmp.path()), &[]).unwrap();
    run(&recipe, &RunOptions::default()).unwrap();
    let run_dir = tmp.path().join("out");
    let log = read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(log.steps.len(), 4);
    // before training, steps 2 and 4
    assert_eq!(log.evals.len(), 3);

    let o = Command::new(env!("CARGO_BIN_EXE_unlearn"))
        .arg("plot")
        .arg(&run_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let printed: Vec<&str> = stdout.lines().collect();
    let training = run_dir.join("plots/training.svg");
    let tradeoff = run_dir.join("plots/tradeoff.svg");
    assert_eq!(
        printed,
        vec![
            training.display().to_string(),
            tradeoff.display().to_string()
        ]
    );
    let svg = std::fs::read_to_string(&training).unwrap();
    check_svg(&svg);
    // graddiff logs loss, forget_loss, retain_loss (and maybe more): one polyline per series
    let series: Vec<String> = {
        let mut keys: Vec<String> = vec![];
        for l in &log.steps {
            for (k, v) in l {
                if v.is_number()
                    && !["step", "lr"].contains(&k.as_str())
                    && !k.starts_with("grad_")
                    && !keys.contains(k)
                {
                    keys.push(k.clone());
                }
            }
        }
        keys
    };
    assert!(series.iter().any(|k| k == "loss"), "{series:?}");
    assert_eq!(count(&svg, "polyline"), series.len());
    let svg = std::fs::read_to_string(&tradeoff).unwrap();
    check_svg(&svg);
    assert_eq!(count(&svg, "circle"), 3);
    assert!(svg.contains("forget metric: forget_nll") && svg.contains("utility: retain_nll"));
    for step in [0, 2, 4] {
        assert!(svg.contains(&format!(">step {step}<")), "step {step}");
    }

    // not a run directory
    let o = Command::new(env!("CARGO_BIN_EXE_unlearn"))
        .arg("plot")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no metrics.jsonl"));
}
