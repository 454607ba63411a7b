//! The demo's picture: per arm, the model's loss on the clean data and the grad norm, each
//! skip, clip, spike and rollback marked, the faults shaded, the step where the unguarded run
//! turns NaN marked, and a grad norm of exactly 0 drawn on its own line (a log scale has no 0).

use plotters::prelude::*;

use super::{Run, FAULTS, STEPS};

const COLORS: [RGBColor; 4] = [
    RGBColor(220, 30, 30),
    RGBColor(240, 150, 0),
    RGBColor(40, 90, 220),
    RGBColor(0, 150, 60),
];

pub fn plot(runs: &[Run], path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 1));
    type Pick = fn(&Run) -> &Vec<f64>;
    for (k, (panel, (title, pick))) in panels
        .iter()
        .zip([
            (
                "loss on the clean data after each step (log scale)",
                (|r: &Run| &r.loss) as Pick,
            ),
            (
                "total grad norm of the step (log scale; 0 drawn on the bottom line)",
                |r: &Run| &r.grad_norm,
            ),
        ])
        .enumerate()
    {
        let positive: Vec<f64> = runs
            .iter()
            .flat_map(|r| pick(r).iter().copied())
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let hi = positive.iter().copied().fold(f64::MIN, f64::max) * 3.0;
        let lo = positive.iter().copied().fold(f64::MAX, f64::min) / 3.0;
        // Exact zeros are drawn at `zero`, below every positive value, on a labelled line.
        let zero = lo / 3.0;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 17))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0..STEPS, (zero / 2.0..hi).log_scale())?;
        chart.configure_mesh().x_desc("step").draw()?;
        for (a, b, label) in FAULTS {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(a, zero / 2.0), (b + 1, hi)],
                RGBColor(120, 120, 120).mix(0.15).filled(),
            )))?;
            if k == 0 {
                chart.draw_series(std::iter::once(Text::new(
                    label,
                    (a + 1, hi / 1.6),
                    ("sans-serif", 13),
                )))?;
            }
        }
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0, zero), (STEPS, zero)],
            BLACK.mix(0.4).stroke_width(1),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            "0",
            (2, zero * 1.15),
            ("sans-serif", 12),
        )))?;
        let at = |v: f64| {
            if v == 0.0 {
                Some(zero)
            } else {
                (v.is_finite() && v > 0.0).then_some(v)
            }
        };
        // The protected arms last, so that the unguarded one is not hidden under them: it is
        // drawn dashed and thick, on top, until it turns NaN.
        for (i, run) in runs.iter().enumerate().rev() {
            let color = COLORS[i % COLORS.len()];
            // Segments between the steps with nothing to draw (a skipped NaN batch's norm); a
            // run that turned NaN or stopped ends where it did.
            let end = run.stopped.or(run.nan_at()).unwrap_or(STEPS);
            let mut segments: Vec<Vec<(usize, f64)>> = vec![Vec::new()];
            for (s, v) in pick(run).iter().enumerate().take(end) {
                match at(*v) {
                    Some(v) => segments.last_mut().expect("one").push((s, v)),
                    None => segments.push(Vec::new()),
                }
            }
            segments.retain(|s| !s.is_empty());
            let pts: Vec<(usize, f64)> = segments.iter().flatten().copied().collect();
            for (j, seg) in segments.iter().enumerate() {
                let drawn = if i == 0 {
                    chart.draw_series(DashedLineSeries::new(
                        seg.clone(),
                        8,
                        5,
                        color.stroke_width(3),
                    ))?
                } else {
                    chart.draw_series(LineSeries::new(seg.clone(), color.stroke_width(2)))?
                };
                if j == 0 {
                    drawn.label(run.name).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                }
            }
            // Where a curve ends: NaN from here, or stopped with a diagnosis.
            if let Some(&(s, v)) = pts.last() {
                let end = match (run.stopped, run.nan_at()) {
                    (Some(_), _) => Some("stopped"),
                    (None, Some(_)) => Some("NaN"),
                    _ => None,
                };
                if let Some(text) = end {
                    chart.draw_series(std::iter::once(TriangleMarker::new(
                        (s, v),
                        8,
                        color.filled(),
                    )))?;
                    // "NaN" above the point, "stopped" below, where both end at one step.
                    let y = if run.stopped.is_some() {
                        v / 2.2
                    } else {
                        v * 1.6
                    };
                    chart.draw_series(std::iter::once(Text::new(
                        format!("{text} (step {})", s + 1),
                        (s + 2, y),
                        ("sans-serif", 14).into_font().color(&color),
                    )))?;
                }
            }
            let mark = |steps: &Vec<usize>| -> Vec<(usize, f64)> {
                steps
                    .iter()
                    .filter_map(|s| pick(run).get(*s).and_then(|v| at(*v)).map(|v| (*s, v)))
                    .collect()
            };
            chart.draw_series(
                mark(&run.clipped)
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.stroke_width(1))),
            )?;
            chart.draw_series(
                mark(&run.skipped)
                    .into_iter()
                    .map(|p| Cross::new(p, 6, BLACK.stroke_width(2))),
            )?;
            chart.draw_series(
                mark(&run.spikes)
                    .into_iter()
                    .map(|p| TriangleMarker::new(p, 7, RGBColor(160, 0, 160).filled())),
            )?;
            for s in &run.rollbacks {
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(*s, zero / 2.0), (*s, hi)],
                    color.stroke_width(2),
                )))?;
                if k == 0 {
                    chart.draw_series(std::iter::once(Text::new(
                        "rollback",
                        (*s + 1, lo * 1.5),
                        ("sans-serif", 13).into_font().color(&color),
                    )))?;
                }
            }
        }
        if k == 0 {
            // What the marks mean.
            let purple = RGBColor(160, 0, 160);
            chart
                .draw_series(std::iter::empty::<Circle<(usize, f64), i32>>())?
                .label("clipped")
                .legend(|(x, y)| Circle::new((x + 10, y), 3, BLACK.stroke_width(1)));
            chart
                .draw_series(std::iter::empty::<Circle<(usize, f64), i32>>())?
                .label("skipped (not applied)")
                .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.stroke_width(2)));
            chart
                .draw_series(std::iter::empty::<Circle<(usize, f64), i32>>())?
                .label("spike (skipped)")
                .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, purple.filled()));
            chart
                .draw_series(std::iter::empty::<Circle<(usize, f64), i32>>())?
                .label("rollback")
                .legend(|(x, y)| {
                    PathElement::new(
                        vec![(x + 10, y - 6), (x + 10, y + 6)],
                        BLACK.stroke_width(2),
                    )
                });
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::MiddleRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}
