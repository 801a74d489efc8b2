//! `--plot_loss`: `training_loss.png` and `training_eval_loss.png` in the
//! output directory, as LLaMA-Factory users expect them: the logged values
//! faint, a smoothed curve over them. And the base-vs-trained report's bar
//! charts.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};
use pt_tasks::{Difference, TaskComparison};
use serde_json::Value;

/// The labels' font, embedded so plots look the same on every machine
/// (DejaVu Sans Mono; its license is next to it).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// TensorBoard's smoothing: an exponential moving average, debiased so the
/// first points are not pulled towards zero.
pub fn smooth(values: &[f64], weight: f64) -> Vec<f64> {
    let mut average = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            average = average * weight + (1.0 - weight) * value;
            average / (1.0 - weight.powi(i as i32 + 1))
        })
        .collect()
}

/// `(step, value)` of every log entry that has `key`.
fn series(log_history: &[Value], key: &str) -> Vec<(f64, f64)> {
    log_history
        .iter()
        .filter_map(|entry| Some((entry["step"].as_f64()?, entry.get(key)?.as_f64()?)))
        .filter(|(_, value)| value.is_finite())
        .collect()
}

fn register_fonts() {
    // Registering twice (a second run in one process) is harmless.
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
}

/// Where systems keep a font with Chinese, Japanese and Korean glyphs
/// (Debian's fonts-wqy-microhei and fonts-noto-cjk, Fedora's, macOS's): the
/// embedded font has none, and Chinese benchmarks often name their subjects
/// in Chinese.
const CJK_FONTS: [&str; 5] = [
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-sans-cjk-vf-fonts/NotoSansCJK-VF.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Medium.ttc",
];

/// The labels' font: the embedded one, or for labels beyond ASCII the first
/// CJK font of [`CJK_FONTS`] found (its Latin glyphs serve the rest).
fn register_fonts_for<'a>(mut labels: impl Iterator<Item = &'a str>) {
    register_fonts();
    if labels.all(|label| label.is_ascii()) {
        return;
    }
    let found = CJK_FONTS.iter().find_map(|path| std::fs::read(path).ok());
    match found {
        // Fonts are registered for the process's life, as plotters keeps
        // them: one font's bytes, once.
        Some(bytes) => {
            let _ = register_font(
                "sans-serif",
                FontStyle::Normal,
                Box::leak(bytes.into_boxed_slice()),
            );
        }
        None => eprintln!(
            "note: no CJK font found ({}); labels in Chinese show as boxes: install fonts-wqy-microhei or fonts-noto-cjk",
            CJK_FONTS[..2].join(", ")
        ),
    }
}

/// Plots `loss` and `eval_loss` from the trainer's log; says which had no
/// values. Returns the files written.
pub fn plot_loss(output_dir: &Path, log_history: &[Value]) -> Result<Vec<PathBuf>> {
    register_fonts();
    let mut written = Vec::new();
    for key in ["loss", "eval_loss"] {
        let points = series(log_history, key);
        if points.is_empty() {
            eprintln!("--plot_loss: no {key} was logged; training_{key}.png not written");
            continue;
        }
        let path = output_dir.join(format!("training_{key}.png"));
        draw(&path, key, &points).map_err(|e| anyhow!("{}: cannot plot: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn draw(path: &Path, key: &str, points: &[(f64, f64)]) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (low, high) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), (_, v)| {
            (lo.min(*v), hi.max(*v))
        });
    let margin = ((high - low) * 0.05).max(1e-6);
    let last_step = points.last().map_or(1.0, |p| p.0).max(1.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("training {key}"), ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..last_step, (low - margin)..(high + margin))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(key)
        .x_label_formatter(&|step| format!("{step:.0}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), BLUE.mix(0.35)))?
        .label("original")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.mix(0.35)));
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let smoothed = smooth(&values, 0.6);
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| p.0).zip(smoothed),
            BLUE.stroke_width(2),
        ))?
        .label("smoothed")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

const BASE_COLOR: RGBColor = RGBColor(150, 150, 150);
const TRAINED_COLOR: RGBColor = RGBColor(31, 119, 180);

/// A task's accuracies, base and trained, over all its questions and per
/// subject: one row each, a bar per model with its standard error, the
/// difference in the row's label.
pub fn plot_comparison(path: &Path, task: &TaskComparison) -> Result<()> {
    let rows: Vec<&Difference> = std::iter::once(&task.overall)
        .chain(&task.subjects)
        .collect();
    register_fonts_for(rows.iter().map(|row| row.subject.as_str()));
    draw_comparison(path, &task.task, &rows)
        .map_err(|e| anyhow!("{}: cannot plot: {e}", path.display()))
}

fn draw_comparison(
    path: &Path,
    task: &str,
    rows: &[&Difference],
) -> Result<(), Box<dyn std::error::Error>> {
    let height = 140 + 46 * rows.len() as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let count = rows.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{task}: accuracy of the base (grey) and trained (blue) model, ± standard error"
            ),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(420)
        .build_cartesian_2d(0.0..1.0, 0.0..count)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_label_formatter(&|_| String::new())
        .x_desc("accuracy")
        .label_style(("sans-serif", 14))
        .draw()?;
    // Row 0 (all questions) at the top.
    let top = |i: usize| count - i as f64;
    for (i, row) in rows.iter().enumerate() {
        let y = top(i);
        let bars = [
            (row.base_acc, row.base_acc_stderr, y - 0.1, BASE_COLOR),
            (
                row.trained_acc,
                row.trained_acc_stderr,
                y - 0.5,
                TRAINED_COLOR,
            ),
        ];
        for (acc, stderr, bar_top, color) in bars {
            let bottom = bar_top - 0.38;
            chart.draw_series([Rectangle::new(
                [(0.0, bar_top), (acc, bottom)],
                color.filled(),
            )])?;
            let middle = (bar_top + bottom) / 2.0;
            let whisker = [
                ((acc - stderr).max(0.0), middle),
                ((acc + stderr).min(1.0), middle),
            ];
            chart.draw_series([PathElement::new(whisker, BLACK.stroke_width(2))])?;
        }
        let label = format!(
            "{} (n={})  Δ {:+.3} ± {:.3}",
            row.subject, row.questions, row.difference, row.difference_stderr
        );
        let (x, y) = chart.backend_coord(&(0.0, y - 0.5));
        let style = TextStyle::from(("sans-serif", 15).into_font())
            .pos(Pos::new(HPos::Right, VPos::Center));
        root.draw(&Text::new(label, (x - 10, y), style))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_a_debiased_moving_average() {
        // By hand, weight 0.5: averages 1, 1.5, 2.75 over debias factors
        // 0.5, 0.75, 0.875 → 2, 2, 3.142857...
        let smoothed = smooth(&[2.0, 2.0, 4.0], 0.5);
        let expected = [2.0, 2.0, 2.75 / 0.875];
        for (got, want) in smoothed.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{smoothed:?}");
        }
    }
}
