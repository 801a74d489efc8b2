//! `trainer_state.json`: HF's `TrainerState`, with the run's shape that a
//! resume checks riding along as a callback's state.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `trainer_state.json` as transformers writes it: exactly the keys of HF's
/// `TrainerState`, so that `TrainerState.load_from_json` (which takes no
/// others) reads it. What pt-host adds rides in `stateful_callbacks` as a
/// callback's state, which HF keeps and does not act on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub epoch: f64,
    pub global_step: usize,
    pub max_steps: usize,
    pub logging_steps: usize,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub train_batch_size: usize,
    pub num_train_epochs: f64,
    #[serde(default)]
    pub num_input_tokens_seen: u64,
    /// HF's estimate: 6 × tokens × non-embedding parameters.
    #[serde(default)]
    pub total_flos: f64,
    pub log_history: Vec<Value>,
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_global_step: Option<usize>,
    #[serde(default)]
    pub best_model_checkpoint: Option<String>,
    #[serde(default = "yes")]
    pub is_local_process_zero: bool,
    #[serde(default = "yes")]
    pub is_world_process_zero: bool,
    #[serde(default)]
    pub is_hyper_param_search: bool,
    #[serde(default)]
    pub trial_name: Option<String>,
    #[serde(default)]
    pub trial_params: Option<Value>,
    #[serde(default)]
    pub stateful_callbacks: StatefulCallbacks,
}

fn yes() -> bool {
    true
}

impl Default for TrainerState {
    fn default() -> Self {
        Self {
            epoch: 0.0,
            global_step: 0,
            max_steps: 0,
            logging_steps: 0,
            eval_steps: 0,
            save_steps: 0,
            train_batch_size: 0,
            num_train_epochs: 0.0,
            num_input_tokens_seen: 0,
            total_flos: 0.0,
            log_history: Vec::new(),
            best_metric: None,
            best_global_step: None,
            best_model_checkpoint: None,
            is_local_process_zero: true,
            is_world_process_zero: true,
            is_hyper_param_search: false,
            trial_name: None,
            trial_params: None,
            stateful_callbacks: StatefulCallbacks::default(),
        }
    }
}

/// HF's `stateful_callbacks`: callback name → `{"args", "attributes"}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatefulCallbacks {
    #[serde(rename = "PtHost", default)]
    pub pt_host: PtHostCallback,
    /// Other callbacks' states (an HF checkpoint's), kept as they were.
    #[serde(flatten)]
    pub others: serde_json::Map<String, Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PtHostCallback {
    #[serde(default)]
    pub args: serde_json::Map<String, Value>,
    #[serde(default)]
    pub attributes: RunShape,
}

/// What a resume must keep to continue the data order and the schedule.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunShape {
    /// Training blocks the run was planned for; a resume with other data is refused.
    #[serde(default)]
    pub train_blocks: usize,
    /// Ranks that trained it (1: one process; 0: not recorded). A resume
    /// keeps `world_size × train_batch_size` and the accumulation steps.
    #[serde(default)]
    pub world_size: usize,
    #[serde(default)]
    pub gradient_accumulation_steps: usize,
}

impl TrainerState {
    /// Reads `trainer_state.json`, including pt-host's earlier layout that
    /// kept the run shape at the top level.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        let mut value: Value = serde_json::from_slice(bytes)?;
        if let Some(object) = value.as_object_mut()
            && object.contains_key("train_blocks")
        {
            let mut shape = serde_json::Map::new();
            for key in ["train_blocks", "world_size", "gradient_accumulation_steps"] {
                if let Some(v) = object.remove(key) {
                    shape.insert(key.into(), v);
                }
            }
            object.insert(
                "stateful_callbacks".into(),
                json!({ "PtHost": { "args": {}, "attributes": shape } }),
            );
        }
        serde_json::from_value(value)
    }

    pub fn shape(&self) -> &RunShape {
        &self.stateful_callbacks.pt_host.attributes
    }
}
