//! `--plot_loss`: `training_loss.png` and `training_eval_loss.png` in the
//! output directory, as LLaMA-Factory users expect them: the logged values
//! faint, a smoothed curve over them.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
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

/// Plots `loss` and `eval_loss` from the trainer's log; says which had no
/// values. Returns the files written.
pub fn plot_loss(output_dir: &Path, log_history: &[Value]) -> Result<Vec<PathBuf>> {
    // Registering twice (a second run in one process) is harmless.
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
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
