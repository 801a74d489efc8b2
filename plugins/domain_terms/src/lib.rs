//! `domain_terms`: an evaluation metric for domain adaptation. It measures how
//! often the model's greedy next-token predictions reproduce the domain terms
//! of the reference text: `term_recall` (matched / occurrences in the
//! reference), `term_precision` (matched / occurrences in the predictions),
//! and `term_occurrences`. A term counts as matched up to the smaller of its
//! counts in reference and prediction.

use pt_plugin_sdk::{Accumulator, Kind, MetricValue, Plugin, Sample, register};
use serde::Deserialize;

const BUNDLED_TERMS: &str = include_str!("../data/terms.txt");

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The terms; the bundled medical list when absent.
    pub terms: Option<Vec<String>>,
    pub case_sensitive: bool,
}

pub struct DomainTerms {
    terms: Vec<String>,
    case_sensitive: bool,
}

#[derive(Default)]
struct Counts {
    terms: Vec<String>,
    case_sensitive: bool,
    in_reference: u64,
    in_prediction: u64,
    matched: u64,
}

impl Accumulator for Counts {
    fn add(&mut self, sample: &Sample) {
        let fold = |s: &str| {
            if self.case_sensitive {
                s.to_string()
            } else {
                s.to_lowercase()
            }
        };
        let (reference, predicted) = (fold(&sample.reference), fold(&sample.predicted));
        for term in &self.terms {
            let r = reference.matches(term.as_str()).count() as u64;
            let p = predicted.matches(term.as_str()).count() as u64;
            self.in_reference += r;
            self.in_prediction += p;
            self.matched += r.min(p);
        }
    }

    fn compute(&self) -> Vec<MetricValue> {
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        vec![
            MetricValue {
                name: "term_recall".into(),
                value: ratio(self.matched, self.in_reference),
                higher_is_better: true,
            },
            MetricValue {
                name: "term_precision".into(),
                value: ratio(self.matched, self.in_prediction),
                higher_is_better: true,
            },
            MetricValue {
                name: "term_occurrences".into(),
                value: self.in_reference as f64,
                higher_is_better: true,
            },
        ]
    }
}

impl Plugin for DomainTerms {
    const ID: &'static str = "domain_terms";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str =
        "Recall and precision of domain terms in the model's greedy predictions";
    const KINDS: &'static [Kind] = &[Kind::Metric];
    const CONFIG_SCHEMA: &'static str = r#"{"type":"object","additionalProperties":false,"properties":{"terms":{"type":"array","items":{"type":"string","minLength":1}},"case_sensitive":{"type":"boolean","default":false}}}"#;

    fn configure(config: &str) -> Result<Self, String> {
        let config: Config = pt_plugin_sdk::parse_config(config)?;
        let terms: Vec<String> = match config.terms {
            Some(terms) => terms,
            None => BUNDLED_TERMS
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect(),
        };
        if terms.iter().any(|t| t.is_empty()) {
            return Err("invalid configuration: `terms` contains an empty string".into());
        }
        let terms = terms
            .into_iter()
            .map(|t| {
                if config.case_sensitive {
                    t
                } else {
                    t.to_lowercase()
                }
            })
            .collect();
        Ok(Self {
            terms,
            case_sensitive: config.case_sensitive,
        })
    }

    fn new_accumulator(&self) -> Box<dyn Accumulator> {
        Box::new(Counts {
            terms: self.terms.clone(),
            case_sensitive: self.case_sensitive,
            ..Counts::default()
        })
    }
}

register!(DomainTerms);

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(reference: &str, predicted: &str) -> Sample {
        Sample {
            reference: reference.into(),
            predicted: predicted.into(),
            ..Sample::default()
        }
    }

    #[test]
    fn recall_and_precision_hand_computed() {
        let plugin = DomainTerms::configure(r#"{"terms": ["fever", "发热"]}"#).unwrap();
        let mut acc = plugin.new_accumulator();
        // reference: fever x2, 发热 x1; prediction: fever x1, 发热 x2 -> matched 1 + 1.
        acc.add(&sample("Fever and fever; 发热", "a fever, 发热发热"));
        acc.add(&sample("no terms here", "fever"));
        let values = acc.compute();
        assert_eq!(values[0].value, 2.0 / 3.0); // recall: 2 matched of 3 in references
        assert_eq!(values[1].value, 2.0 / 4.0); // precision: 2 of 4 predicted occurrences
        assert_eq!(values[2].value, 3.0);
    }

    #[test]
    fn bundled_terms_and_config_errors() {
        assert!(
            DomainTerms::configure("{}")
                .unwrap()
                .terms
                .contains(&"传染病".to_string())
        );
        assert!(DomainTerms::configure(r#"{"terms": [""]}"#).is_err());
        assert!(
            DomainTerms::configure(r#"{"term": []}"#)
                .err()
                .unwrap()
                .contains("term")
        );
    }
}
