//! Custom evaluation metrics from metric plugins: one session per plugin
//! per evaluation, fed every block's samples, under names that cannot pass
//! for the host's own; and the benchmark tasks' accuracies.

use anyhow::{Result, bail};
use pt_data::Tokenizer;
use pt_model::Model;
use pt_plugin_host::{Kind, LoadedPlugin, MetricSession, Sample};
use pt_train::evaluate::{EvalSample, MetricSink};

use crate::benchmarks::Benchmarks;
use crate::prepare::PreparedData;

/// Metric names a plugin may not use: written as `eval_NAME` they would
/// overwrite (or be mistaken for) the host's own evaluation keys.
const RESERVED_METRIC_NAMES: &[&str] = &[
    "loss",
    "accuracy",
    "perplexity",
    "samples",
    "tokens",
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "epoch",
    "step",
];

/// The metric plugins among `--plugin`, fed the evaluation's samples: one
/// accumulator per plugin per evaluation.
pub struct PluginMetrics<'a> {
    plugins: Vec<&'a LoadedPlugin>,
    tokenizer: &'a Tokenizer,
    sessions: Vec<MetricSession>,
    benchmarks: Option<&'a Benchmarks<'a>>,
}

impl<'a> PluginMetrics<'a> {
    pub fn new(data: &'a PreparedData, benchmarks: Option<&'a Benchmarks<'a>>) -> Self {
        let plugins = data
            .plugins
            .iter()
            .filter_map(|p| p.wasm())
            .filter(|p| p.has_kind(Kind::Metric))
            .collect();
        Self {
            plugins,
            tokenizer: &data.tokenizer,
            sessions: Vec::new(),
            benchmarks,
        }
    }

    pub fn as_sink(&mut self) -> Option<&mut dyn MetricSink> {
        if self.plugins.is_empty() && self.benchmarks.is_none() {
            None
        } else {
            Some(self)
        }
    }
}

impl MetricSink for PluginMetrics<'_> {
    fn wants_samples(&self) -> bool {
        !self.plugins.is_empty()
    }

    fn add(&mut self, samples: &[EvalSample]) -> Result<()> {
        if self.sessions.is_empty() {
            self.sessions = self
                .plugins
                .iter()
                .map(|p| p.metric_session())
                .collect::<Result<_>>()?;
        }
        let samples: Vec<Sample> = samples
            .iter()
            .map(|s| {
                Ok(Sample {
                    reference: self.tokenizer.decode(&s.tokens)?,
                    predicted: self.tokenizer.decode(&s.predicted)?,
                    token_logprobs: s.logprobs.clone(),
                    continuation: None,
                })
            })
            .collect::<Result<_>>()?;
        for session in &mut self.sessions {
            session.add_batch(&samples)?;
        }
        Ok(())
    }

    /// Every plugin's values, each to be written as `eval_NAME`: a name that
    /// would overwrite a host-owned key, or one another plugin already gave,
    /// is refused with the plugin's name. Then the benchmark tasks'.
    fn finish(&mut self, model: &Model) -> Result<Vec<(String, f64)>> {
        let mut values: Vec<(String, f64)> = Vec::new();
        for (plugin, mut session) in self.plugins.iter().zip(std::mem::take(&mut self.sessions)) {
            for metric in session.compute()? {
                if RESERVED_METRIC_NAMES.contains(&metric.name.as_str()) {
                    bail!(
                        "metric plugin `{}` returned metric `{}`, which is pt-host's own (reserved: {}); rename it in the plugin",
                        plugin.name,
                        metric.name,
                        RESERVED_METRIC_NAMES.join(", ")
                    );
                }
                if values.iter().any(|(name, _)| *name == metric.name) {
                    bail!(
                        "metric plugin `{}` returned metric `{}` more than once (or another metric plugin did too)",
                        plugin.name,
                        metric.name
                    );
                }
                values.push((metric.name, metric.value));
            }
        }
        if let Some(benchmarks) = self.benchmarks {
            values.extend(benchmarks.score(model)?);
        }
        Ok(values)
    }
}
