use pt_plugin_sdk::{Decision, Document, Kind, Plugin, register};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Filter {
    min_chars: usize,
}

impl Default for Filter {
    fn default() -> Self {
        Self { min_chars: 10 }
    }
}

impl Plugin for Filter {
    const ID: &'static str = "{{name}}";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "Drops documents shorter than min_chars";
    const KINDS: &'static [Kind] = &[Kind::Filter];

    fn configure(config: &str) -> Result<Self, String> {
        pt_plugin_sdk::parse_config(config)
    }

    fn filter(&self, doc: &Document) -> Decision {
        if doc.text.chars().filter(|c| !c.is_whitespace()).count() < self.min_chars {
            Decision::Drop("too_short".into())
        } else {
            Decision::Keep
        }
    }
}

register!(Filter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_short_documents() {
        let filter = Filter::configure("{}").unwrap();
        let doc = |text: &str| Document { source: "t:1".into(), text: text.into() };
        assert_eq!(filter.filter(&doc("太短\n")), Decision::Drop("too_short".into()));
        assert_eq!(filter.filter(&doc("这是一段足够长的文本，应当保留下来。\n")), Decision::Keep);
        assert!(Filter::configure(r#"{"min_char": 3}"#).is_err());
    }
}
