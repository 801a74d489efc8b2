//! BLOOM against HF transformers' own numbers on the bloom-tiny fixture
//! (f32, CPU): logits within 1e-4 absolute, loss within 1e-5 relative; the
//! bf16 compute path within bf16 rounding.

#[path = "../../../tests/support/bloom_tiny.rs"]
mod bloom_tiny;

use bloom_tiny::{
    FAMILIES, expected, expected_of, fixture, fixture_of, max_abs_diff, rows, test_device,
};
use candle_core::{DType, Device};
use pt_model::loss::next_token_loss_sum;
use pt_model::{BlockWeights, Model};

fn fixture_model(dtype: DType) -> Model {
    family_model("bloom", dtype)
}

fn family_model(family: &str, dtype: DType) -> Model {
    Model::load(&fixture_of(family).join("model"), &test_device(), dtype).unwrap()
}

/// The largest logit difference from HF's at the probes' real tokens.
fn probe_logit_error(model: &Model) -> f32 {
    let expected = expected_of(&model.config().model_type);
    let ids = rows(&expected["probe_input_ids"]);
    let mask = rows(&expected["probe_attention_mask"]);
    assert!(
        mask.iter().any(|r| r[0] == 0),
        "the probes include left padding"
    );
    let logits = model
        .forward(&ids, &mask)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let reference = expected["probe_logits"].to_vec3::<f32>().unwrap();
    let mut worst = 0f32;
    for (b, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in logits[b][t].iter().zip(&reference[b][t]) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    worst
}

/// Our mean loss over HF's validation blocks, and HF's.
fn validation_loss(model: &Model) -> (f64, f64) {
    let expected = expected_of(&model.config().model_type);
    let blocks = rows(&expected["valid_blocks"]);
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in blocks.chunks(16) {
        let mask: Vec<Vec<u32>> = chunk.iter().map(|r| vec![1; r.len()]).collect();
        let logits = model.forward(chunk, &mask).unwrap();
        let labels: Vec<Vec<i64>> = chunk
            .iter()
            .map(|r| r.iter().map(|&v| v as i64).collect())
            .collect();
        let (loss, n) = next_token_loss_sum(&logits, &labels).unwrap();
        sum += loss.to_scalar::<f32>().unwrap() as f64;
        count += n;
    }
    let hf = expected["valid_loss"].to_vec1::<f32>().unwrap()[0] as f64;
    (sum / count as f64, hf)
}

/// Every family's fixture (GQA, RoPE with llama3 scaling, a sliding
/// window, q/k/v biases, q/k norms, tied and untied heads; sharded bf16
/// and 4.x-dialect checkpoints).
#[test]
fn logits_match_hf_on_left_padded_probes() {
    for family in FAMILIES {
        let worst = probe_logit_error(&family_model(family, DType::F32));
        assert!(
            worst < 1e-4,
            "{family}: largest logit difference at tokens: {worst}"
        );
    }
}

#[test]
fn validation_loss_matches_hf() {
    for family in FAMILIES {
        let (ours, hf) = validation_loss(&family_model(family, DType::F32));
        assert!(
            ((ours - hf) / hf).abs() < 1e-5,
            "{family}: ours {ours}, HF {hf}"
        );
    }
}

/// The CUDA path's precision (bf16 base weights and hidden states; f32
/// LayerNorm statistics, softmax, LoRA and loss), run on the CPU: within
/// bf16's rounding of HF's f32 numbers, and finite on left-padded rows.
#[test]
fn bf16_compute_stays_within_rounding_of_hf() {
    let model = fixture_model(DType::BF16);
    assert_eq!(model.dtype(), DType::BF16);
    // bf16 keeps 8 significant bits: 2^-8 of the largest logit (5.05) is 0.02.
    let worst = probe_logit_error(&model);
    assert!(worst < 0.06, "largest logit difference: {worst}");
    // Rounding errors average out over ~2k tokens (measured: 4e-6 relative).
    let (ours, hf) = validation_loss(&model);
    assert!(((ours - hf) / hf).abs() < 1e-4, "ours {ours}, HF {hf}");
}

#[test]
fn wrong_checkpoints_are_refused_clearly() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    let refusal = |config: &str| {
        std::fs::write(dir.join("config.json"), config).unwrap();
        format!(
            "{:#}",
            Model::load(&dir, &Device::Cpu, DType::F32).err().unwrap()
        )
    };
    let err = refusal(r#"{"model_type": "gpt2", "n_embd": 8}"#);
    assert!(
        err.contains("model_type `gpt2` is not one pt-host trains (it trains bloom, llama, mistral, qwen2, qwen3)"),
        "{err}"
    );
    // A Llama config in BLOOM's key names.
    let err = refusal(
        r#"{"model_type": "llama", "hidden_size": 8, "n_head": 2, "n_layer": 1, "vocab_size": 10}"#,
    );
    assert!(
        err.contains("not a Llama-family config") && err.contains("missing field"),
        "{err}"
    );
    // Shapes are checked against config.json.
    let config = std::fs::read_to_string(fixture().join("model/config.json"))
        .unwrap()
        .replace("\"hidden_size\": 64", "\"hidden_size\": 128");
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::copy(
        fixture().join("model/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = Model::load(&dir, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(
            "`word_embeddings.weight` has shape [2000, 64], config.json implies [2000, 128]"
        ),
        "{err}"
    );
}

/// Llama-family checkpoints that pt-host would compute wrongly, or that
/// point outside their directory, are refused with what is wrong.
#[test]
fn unsupported_or_unsafe_llama_family_checkpoints_are_refused() {
    let config = || -> serde_json::Value {
        let path = fixture_of("qwen3").join("model/config.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let refusal = |config: serde_json::Value, files: &[(&str, &[u8])]| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        format!(
            "{:#}",
            Model::load(dir.path(), &Device::Cpu, DType::F32)
                .err()
                .unwrap()
        )
    };
    let weights = std::fs::read(fixture_of("qwen3").join("model/model.safetensors")).unwrap();
    let with_weights = [("model.safetensors", weights.as_slice())];
    let mut yarn = config();
    yarn["rope_parameters"] =
        serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0});
    assert!(refusal(yarn, &with_weights).contains("rope_type `yarn` is not supported"));
    let mut heads = config();
    heads["num_key_value_heads"] = 3.into();
    let err = refusal(heads, &with_weights);
    assert!(
        err.contains("num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        "{err}"
    );
    let mut gelu = config();
    gelu["hidden_act"] = "gelu".into();
    assert!(refusal(gelu, &with_weights).contains("hidden_act `gelu` is not supported"));
    // A shard named outside the directory is never opened.
    let index = br#"{"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}"#;
    let err = refusal(
        config(),
        &[("model.safetensors.index.json", index.as_slice())],
    );
    assert!(err.contains("bad shard name"), "{err}");
    let err = refusal(config(), &[("pytorch_model.bin", b"pickle".as_slice())]);
    assert!(
        err.contains("only pytorch_model.bin") && err.contains("save_pretrained"),
        "{err}"
    );
}

#[test]
fn adapters_that_target_nothing_or_miss_weights_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let config = std::fs::read_to_string(fixture().join("lora_init/adapter_config.json")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        config
            .replace("\"query_key_value\"", "\"q_proj\"")
            .replace("\"dense\",", "")
            .replace("\"dense_h_to_4h\",", "")
            .replace("\"dense_4h_to_h\",", ""),
    )
    .unwrap();
    std::fs::copy(
        fixture().join("lora_init/adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut model = fixture_model(DType::F32);
    let err = model.load_adapter(dir).err().unwrap().to_string();
    assert!(
        err.contains("target_modules [\"q_proj\"] match no layer"),
        "{err}"
    );
}

/// Token ids, attention mask and labels of a batch.
type Batch = (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<i64>>);

/// Two validation blocks with a full attention mask.
fn two_blocks(family: &str) -> Batch {
    let batch = rows(&expected_of(family)["valid_blocks"])[..2].to_vec();
    let mask = batch.iter().map(|r| vec![1; r.len()]).collect();
    let labels = batch
        .iter()
        .map(|r| r.iter().map(|&v| v as i64).collect())
        .collect();
    (batch, mask, labels)
}

/// The weight names of a fixture's checkpoint (one file or shards), as
/// pt-host names them (BLOOM's with the `transformer.` prefix).
fn checkpoint_names(family: &str) -> std::collections::BTreeSet<String> {
    let dir = fixture_of(family).join("model");
    let index = dir.join("model.safetensors.index.json");
    let names: Vec<String> = if index.is_file() {
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
        index["weight_map"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    } else {
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect()
    };
    names
        .into_iter()
        .map(|n| match family {
            "bloom" if !n.starts_with("transformer.") => format!("transformer.{n}"),
            _ => n,
        })
        .collect()
}

/// The training path (chunked loss, trainable linear layers) gives every
/// base weight of a fully fine-tuned model of every family a gradient.
#[test]
fn full_fine_tuning_gives_every_weight_a_gradient() {
    for family in FAMILIES {
        let mut model = family_model(family, DType::F32);
        let trainable = model.make_base_trainable().unwrap();
        let (batch, mask, labels) = two_blocks(family);
        let grads = model
            .loss_sum(&batch, &mask, &labels)
            .unwrap()
            .0
            .backward()
            .unwrap();
        let names = trainable.iter().map(|(name, _)| name.clone()).collect();
        assert_eq!(
            checkpoint_names(family),
            names,
            "{family}: every weight trains"
        );
        for (name, var) in trainable {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{family} {name}: no gradient"));
            let largest = g.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(
                largest.to_scalar::<f32>().unwrap() > 0.0,
                "{family} {name}: zero gradient"
            );
        }
    }
}

/// Backward reaches every LoRA weight and computes nothing for the frozen
/// base, in f32 and with bf16 base weights (the f32 adapters still get f32
/// gradients).
#[test]
fn only_adapter_weights_get_gradients() {
    for family in FAMILIES {
        for dtype in [DType::F32, DType::BF16] {
            assert_only_adapters_get_gradients(family, family_model(family, dtype));
        }
    }
}

fn assert_only_adapters_get_gradients(family: &str, mut model: Model) {
    model
        .load_adapter(&fixture_of(family).join("lora_init"))
        .unwrap();
    let (batch, mask, labels) = two_blocks(family);
    let batch = &batch[..];
    // The training path (chunked loss, fused ops) computes what the plain
    // forward pass and loss compute.
    let (loss, _) = model.loss_sum(batch, &mask, &labels).unwrap();
    let (reference, _) =
        next_token_loss_sum(&model.forward(batch, &mask).unwrap(), &labels).unwrap();
    let (a, b) = (
        loss.to_scalar::<f32>().unwrap(),
        reference.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    let grads = loss.backward().unwrap();
    for (name, var) in model.lora_variables() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
        assert!(
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{name}: zero gradient"
        );
    }
    let frozen = model.base_tensors_mut();
    assert_eq!(frozen.len(), checkpoint_names(family).len());
    let matrices_with_gradients = frozen
        .iter()
        .map(|(_, t)| &**t)
        .filter(|t| t.rank() == 2 && grads.get(t).is_some())
        .count();
    assert_eq!(
        matrices_with_gradients, 0,
        "no gradient is computed for frozen weight matrices"
    );
}

/// The original bigscience checkpoints: keys without `transformer.`, legacy
/// config names, half-precision storage.
#[test]
fn legacy_keys_and_half_precision_checkpoints_load() {
    let original = fixture_model(DType::F32);
    let tensors =
        candle_core::safetensors::load(fixture().join("model/model.safetensors"), &Device::Cpu)
            .unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("model/config.json")).unwrap(),
    )
    .unwrap();
    let mut legacy = serde_json::Map::new();
    for (key, value) in config.as_object().unwrap() {
        let renamed = match key.as_str() {
            "hidden_size" => "n_embed",
            "n_head" => "num_attention_heads",
            "n_layer" => "num_hidden_layers",
            other => other,
        };
        legacy.insert(renamed.to_string(), value.clone());
    }
    let ids = rows(&expected()["probe_input_ids"]);
    let mask = rows(&expected()["probe_attention_mask"]);
    let reference = original.forward(&ids, &mask).unwrap();
    for (dtype, tolerance) in [(DType::F32, 0.0), (DType::BF16, 0.5)] {
        let temp = tempfile::tempdir().unwrap();
        std::fs::write(
            temp.path().join("config.json"),
            serde_json::to_vec(&legacy).unwrap(),
        )
        .unwrap();
        let stripped: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .iter()
            .map(|(k, v)| {
                (
                    k.trim_start_matches("transformer.").to_string(),
                    v.to_dtype(dtype).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&stripped, temp.path().join("model.safetensors")).unwrap();
        let model = Model::load(temp.path(), &Device::Cpu, DType::F32).unwrap();
        let logits = model.forward(&ids, &mask).unwrap();
        let diff = max_abs_diff(&logits, &reference);
        assert!(diff <= tolerance, "{dtype:?}: logits differ by {diff}");
    }
}

fn generation_reference() -> serde_json::Value {
    generation_reference_of("bloom")
}

fn generation_reference_of(family: &str) -> serde_json::Value {
    let path = fixture_of(family).join("generate.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn id_rows(value: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(value.clone()).unwrap()
}

/// One position at a time through the cache gives the logits a full
/// forward pass gives at each position, padding included.
#[test]
fn cached_decoding_matches_the_full_forward_pass() {
    for family in FAMILIES {
        cached_decoding_matches(&family_model(family, DType::F32));
    }
}

fn cached_decoding_matches(model: &Model) {
    let prompts = id_rows(&generation_reference()["prompt_ids"]);
    let width = prompts.iter().map(Vec::len).max().unwrap();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| [vec![3; width - p.len()], p.clone(), vec![100, 200, 300]].concat())
        .collect();
    let mask: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| [vec![0; width - p.len()], vec![1; p.len() + 3]].concat())
        .collect();
    let full = model.forward(&ids, &mask).unwrap();
    let mut cache = pt_model::KvCache::default();
    let prefix = |rows: &[Vec<u32>], range: std::ops::Range<usize>| -> Vec<Vec<u32>> {
        rows.iter().map(|r| r[range.clone()].to_vec()).collect()
    };
    let mut logits = model
        .forward_cached(
            &prefix(&ids, 0..width),
            &prefix(&mask, 0..width),
            &mut cache,
        )
        .unwrap();
    for position in width..width + 3 {
        let expected = full.narrow(1, position - 1, 1).unwrap().squeeze(1).unwrap();
        let diff = max_abs_diff(&logits, &expected);
        assert!(
            diff < 1e-4,
            "{}: position {position}: {diff}",
            model.config().model_type
        );
        logits = model
            .forward_cached(
                &prefix(&ids, position..position + 1),
                &prefix(&mask, 0..position + 1),
                &mut cache,
            )
            .unwrap();
    }
}

/// Greedy decoding of a left-padded batch, with and without a repetition
/// penalty, produces HF `generate`'s tokens (tests/python/generate_reference.py).
#[test]
fn greedy_generation_equals_hf() {
    for family in FAMILIES {
        greedy_generation_equals_hf_on(family);
    }
}

fn greedy_generation_equals_hf_on(family: &str) {
    let model = family_model(family, DType::F32);
    let reference = generation_reference_of(family);
    let prompts = id_rows(&reference["prompt_ids"]);
    for case in reference["cases"].as_array().unwrap() {
        let config = pt_model::generate::GenerationConfig {
            max_new_tokens: reference["max_new_tokens"].as_u64().unwrap() as usize,
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: case["repetition_penalty"].as_f64().unwrap(),
            seed: 0,
            eos_id: 2,
            pad_id: 3,
        };
        let mut streamed = vec![Vec::new(); prompts.len()];
        let ours = pt_model::generate::generate(&model, &prompts, &config, &mut |row, token| {
            streamed[row].push(token);
            Ok(())
        })
        .unwrap();
        // HF pads a row after its EOS; ours stops there.
        let hf: Vec<Vec<u32>> = id_rows(&case["new_tokens"])
            .into_iter()
            .map(|row| match row.iter().position(|&t| t == 2) {
                Some(eos) => row[..=eos].to_vec(),
                None => row,
            })
            .collect();
        assert_eq!(
            ours, hf,
            "{family}: repetition penalty {}",
            case["repetition_penalty"]
        );
        assert_eq!(streamed, ours, "every token is streamed as it is chosen");
    }
}

/// Sampling is reproducible from its seed, and top-k 1 is greedy.
#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    let model = fixture_model(DType::F32);
    let prompts = id_rows(&generation_reference()["prompt_ids"]);
    let config = pt_model::generate::GenerationConfig {
        max_new_tokens: 8,
        do_sample: true,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 7,
        eos_id: 2,
        pad_id: 3,
    };
    let run = |config: &pt_model::generate::GenerationConfig| {
        pt_model::generate::generate(&model, &prompts, config, &mut |_, _| Ok(())).unwrap()
    };
    assert_eq!(run(&config), run(&config));
    let greedy = run(&pt_model::generate::GenerationConfig {
        do_sample: false,
        ..config.clone()
    });
    assert_ne!(
        run(&config),
        greedy,
        "sampling from a random model differs from greedy"
    );
    assert_eq!(
        run(&pt_model::generate::GenerationConfig {
            top_k: 1,
            ..config.clone()
        }),
        greedy
    );
}

/// A fresh model as HF initialises one predicts nearly uniformly: its loss
/// on real text is close to ln(vocab).
#[test]
fn random_initialisation_predicts_nearly_uniformly() {
    let dir = tempfile::tempdir().unwrap();
    let config = pt_model::bloom::Config {
        hidden_size: 64,
        n_head: 4,
        n_layer: 2,
        vocab_size: 2000,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        model_type: Some("bloom".into()),
    };
    pt_model::init::write_random_model(dir.path(), &config, 0.02, 1).unwrap();
    let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let embeddings: Vec<f32> =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap()
            ["transformer.word_embeddings.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
    let variance = embeddings.iter().map(|v| (v * v) as f64).sum::<f64>() / embeddings.len() as f64;
    assert!(
        (variance.sqrt() - 0.02).abs() < 0.001,
        "std {}",
        variance.sqrt()
    );
    let (loss, _) = validation_loss(&model);
    let uniform = 2000f64.ln();
    assert!(
        (loss - uniform).abs() / uniform < 0.01,
        "loss {loss} vs ln 2000 = {uniform}"
    );
}

/// The embedding (and an untied head) of `model`, by checkpoint name.
fn vocabulary_matrices(model: &mut Model) -> Vec<(String, candle_core::Tensor)> {
    let embedding = format!("{}.weight", model.embedding_module());
    model
        .base_tensors_mut()
        .into_iter()
        .filter(|(name, _)| *name == embedding || name == "lm_head.weight")
        .map(|(name, t)| (name, t.clone()))
        .collect()
}

/// A grown vocabulary trained through `modules_to_save`: new rows start at
/// the mean, every trained matrix gets a gradient (new rows included), a
/// tied head trains as the embedding, and the saved adapter restores the
/// same model (vocabulary size included) on a fresh base.
#[test]
fn modules_to_save_train_a_grown_vocabulary_and_round_trip() {
    for family in ["bloom", "llama", "qwen3"] {
        let mut model = family_model(family, DType::F32);
        model
            .load_adapter(&fixture_of(family).join("lora_init"))
            .unwrap();
        let old = model.config().vocab_size;
        let before = vocabulary_matrices(&mut model);
        model.resize_vocabulary(old + 5).unwrap();
        for ((name, grown), (_, original)) in vocabulary_matrices(&mut model).iter().zip(&before) {
            let mean = original.mean_keepdim(0).unwrap();
            let added = grown.narrow(0, old, 5).unwrap();
            let drift = max_abs_diff(&added, &mean.broadcast_as(added.shape()).unwrap());
            assert!(drift < 1e-7, "{family} {name}: {drift}");
        }
        let short = model.embedding_name();
        let modules = model
            .train_modules(&["lm_head".to_string(), short.to_string()])
            .unwrap();
        let tied = model.config().tie_word_embeddings;
        let expected: Vec<&str> = if tied {
            vec![short]
        } else {
            vec!["lm_head", short]
        };
        let mut sorted = modules.clone();
        sorted.sort();
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(sorted, want, "{family}");
        // A batch using a new token: its rows get gradients too.
        let (mut batch, mask, mut labels) = two_blocks(family);
        batch[0][3] = (old + 2) as u32;
        labels[0][3] = (old + 2) as i64;
        let (loss, _) = model.loss_sum(&batch, &mask, &labels).unwrap();
        let grads = loss.backward().unwrap();
        let variables = model.adapter_variables();
        let trained: Vec<&(String, candle_core::Var)> = variables
            .iter()
            .filter(|(n, _)| !n.contains("lora_"))
            .collect();
        assert_eq!(trained.len(), if tied { 1 } else { 2 }, "{family}");
        for (name, var) in &trained {
            let grad = grads.get(var.as_tensor()).expect(name);
            let new_row = grad.get(old + 2).unwrap().abs().unwrap().sum_all().unwrap();
            assert!(new_row.to_scalar::<f32>().unwrap() > 0.0, "{family} {name}");
        }
        // Trained values, saved and loaded on a fresh base.
        for (_, var) in &trained {
            let noise = var.as_tensor().randn_like(0.0, 0.01).unwrap();
            var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
        }
        let config = pt_model::AdapterConfig {
            modules_to_save: Some(modules),
            ..pt_model::peft::AdapterConfig::read(&fixture_of(family).join("lora_init")).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        model.save_adapter(dir.path(), &config, "base").unwrap();
        let mut loaded = family_model(family, DType::F32);
        loaded.load_adapter(dir.path()).unwrap();
        assert_eq!(loaded.config().vocab_size, old + 5);
        let same = max_abs_diff(
            &model.forward(&batch, &mask).unwrap(),
            &loaded.forward(&batch, &mask).unwrap(),
        );
        assert_eq!(same, 0.0, "{family}");
        let names = |m: &mut Model| -> Vec<String> {
            m.adapter_variables().into_iter().map(|(n, _)| n).collect()
        };
        assert_eq!(names(&mut loaded), names(&mut model), "{family}");
    }
}

/// A PEFT adapter that trained a tied model's embedding and head apart
/// (PEFT without ensure_weight_tying) cannot be represented tied: refused.
#[test]
fn an_adapter_that_unties_a_tied_head_is_refused() {
    let mut model = family_model("qwen3", DType::F32);
    let short = model.embedding_name().to_string();
    let modules = model.train_modules(&[short]).unwrap();
    let config = pt_model::AdapterConfig {
        modules_to_save: Some(modules),
        ..pt_model::peft::AdapterConfig::read(&fixture_of("qwen3").join("lora_init")).unwrap()
    };
    model
        .load_adapter(&fixture_of("qwen3").join("lora_init"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), &config, "base").unwrap();
    let file = dir.path().join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let head = tensors
        .remove("base_model.model.lm_head.weight")
        .expect("a tied head is saved");
    tensors.insert(
        "base_model.model.lm_head.weight".into(),
        (head + 0.5).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let error = family_model("qwen3", DType::F32)
        .load_adapter(dir.path())
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("keeps tied weights tied"),
        "{error:#}"
    );
}

/// NF4 quantisation gives bitsandbytes' bytes (`qlora/nf4.safetensors`, made
/// by `tests/python/nf4_reference.py` with its CPU path): every linear weight
/// of the BLOOM and Qwen3 fixtures and an edge-case tensor, plain and double
/// quantised. The double quantisation's offset is PyTorch's f32 `mean`, whose
/// summation order depends on the CPU, so it is compared within 2 ulps and
/// the nested codes are checked from bitsandbytes' own offset.
#[test]
fn nf4_quantisation_gives_bitsandbytes_bytes() {
    use pt_model::nf4::{
        BlockScales, NESTED_BLOCK, Nf4Config, Nf4Weight, dynamic_map, quantize_blockwise,
        quantize_nf4,
    };
    let bytes = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let floats = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for family in ["bloom", "qwen3"] {
        let dir = fixture_of(family);
        let reference =
            candle_core::safetensors::load(dir.join("qlora/nf4.safetensors"), &Device::Cpu)
                .unwrap();
        assert_eq!(&floats(&reference["dynamic_map"])[..], &dynamic_map()[..]);
        let weights =
            candle_core::safetensors::load(dir.join("model/model.safetensors"), &Device::Cpu)
                .unwrap();
        let mut names: Vec<&str> = reference
            .keys()
            .filter_map(|key| key.strip_suffix(".codes"))
            .filter(|name| !name.ends_with(".nested"))
            .collect();
        names.sort();
        // Four linear layers per BLOOM block, seven per Qwen3 block, two blocks, and `edge`.
        assert_eq!(
            names.len(),
            if family == "bloom" { 9 } else { 15 },
            "{names:?}"
        );
        for name in names {
            let values = match name {
                "edge" => floats(&reference["edge"]),
                _ => floats(&weights[name].to_dtype(DType::F32).unwrap()),
            };
            let (codes, absmax) = quantize_nf4(&values);
            let theirs = |part: &str| &reference[&format!("{name}.{part}")];
            assert_eq!(codes, bytes(theirs("codes")), "{family} {name}: codes");
            assert_eq!(absmax.len(), theirs("absmax").dim(0).unwrap());
            for (i, (a, b)) in absmax.iter().zip(floats(theirs("absmax"))).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{family} {name}: absmax {i}");
            }
            let offset = floats(theirs("offset"))[0];
            let config = Nf4Config {
                double_quant: true,
                compute_dtype: DType::F32,
            };
            let tensor = candle_core::Tensor::new(values.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let BlockScales::Nested { offset: ours, .. } =
                Nf4Weight::quantize(&tensor, config).unwrap().scales
            else {
                panic!("double quantisation keeps nested scales");
            };
            assert!(
                (ours.to_bits() as i64 - offset.to_bits() as i64).abs() <= 2,
                "{family} {name}: offset {ours} vs {offset}"
            );
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let (nested_codes, nested_absmax) =
                quantize_blockwise(&centred, dynamic_map(), NESTED_BLOCK);
            assert_eq!(
                nested_codes,
                bytes(theirs("nested_codes")),
                "{family} {name}: nested codes"
            );
            assert_eq!(
                nested_absmax,
                floats(theirs("nested_absmax")),
                "{family} {name}"
            );
        }
    }
}

/// A 4-bit base refuses to train whole or to be saved unmerged, saying why;
/// merging dequantises every layer, adapter or not, so the model saves.
#[test]
fn an_nf4_base_trains_through_adapters_and_saves_merged() {
    use pt_model::nf4::Nf4Config;
    let config = Nf4Config {
        double_quant: true,
        compute_dtype: DType::F32,
    };
    let source = fixture().join("model");
    let mut model = Model::load_with(
        &source,
        &Device::Cpu,
        DType::F32,
        Some(BlockWeights::Nf4(config)),
    )
    .unwrap();
    assert!(model.has_compact_weights());
    let error = model.make_base_trainable().unwrap_err();
    assert!(
        error
            .to_string()
            .contains("trains through LoRA adapters only"),
        "{error}"
    );
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("merged");
    let error = model
        .save_model(&saved, &source, DType::F32, u64::MAX)
        .unwrap_err();
    assert!(
        error.to_string().contains("merge_adapters widens them"),
        "{error}"
    );
    assert_eq!(model.merge_adapters().unwrap(), 0);
    assert!(!model.has_compact_weights());
    model
        .save_model(&saved, &source, DType::F32, u64::MAX)
        .unwrap();
    assert!(saved.join("model.safetensors").is_file());
}

/// A base held in bf16 on the CPU (`--frozen_weights bf16`) computes, in
/// every family, what the f32 model computes with each block's linear
/// weights rounded to bf16 through candle's dense ops: logits, and the
/// LoRA gradients through the backward pass's `g W`. It holds those weights
/// in 2 bytes each, and it trains through adapters only. (The Qwen2
/// fixture is stored in bf16, so there the rounding changes nothing.)
#[test]
fn a_bf16_held_base_computes_its_rounded_weights_in_f32() {
    let cpu = &Device::Cpu;
    for family in FAMILIES {
        let dir = fixture_of(family).join("model");
        let mut held = Model::load_with(&dir, cpu, DType::F32, Some(BlockWeights::Bf16)).unwrap();
        let plain = Model::load(&dir, cpu, DType::F32).unwrap();
        let mut rounded = Model::load(&dir, cpu, DType::F32).unwrap();
        let blocks = if family == "bloom" {
            ".h."
        } else {
            "model.layers."
        };
        let (mut matrices, mut elements, mut changed) = (0, 0, false);
        for (name, tensor) in rounded.base_tensors_mut() {
            if tensor.rank() == 2 && name.contains(blocks) {
                matrices += 1;
                elements += tensor.elem_count();
                let bf16 = tensor
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                changed |= max_abs_diff(&bf16, tensor) > 0.0;
                *tensor = bf16;
            }
        }
        assert!(elements > 0, "{family}: the blocks have linear weights");
        assert_eq!(held.compact_size(), (2 * elements, elements), "{family}");
        assert_eq!(
            held.base_tensors_mut().len() + matrices,
            checkpoint_names(family).len(),
            "{family}: the blocks' linear weights are held, the rest are tensors"
        );
        let (batch, mask, labels) = two_blocks(family);
        let logits = |model: &Model| model.forward(&batch, &mask).unwrap();
        let difference = max_abs_diff(&logits(&held), &logits(&rounded));
        assert!(difference < 1e-5, "{family}: logits differ by {difference}");
        // Rounded, not f32 (where the checkpoint is not bf16 already); within
        // bf16's rounding of HF's numbers.
        let from_f32 = max_abs_diff(&logits(&held), &logits(&plain));
        assert_eq!(
            from_f32 > 1e-4,
            changed,
            "{family}: {from_f32} from the f32 model's logits"
        );
        let error = probe_logit_error(&held);
        assert!(error < 0.06, "{family}: {error} from HF's logits");
        let adapter = fixture_of(family).join("lora_init");
        held.load_adapter(&adapter).unwrap();
        rounded.load_adapter(&adapter).unwrap();
        let gradients = |model: &mut Model| {
            let grads = model
                .loss_sum(&batch, &mask, &labels)
                .unwrap()
                .0
                .backward()
                .unwrap();
            model
                .lora_variables()
                .into_iter()
                .map(|(name, var)| (name, grads.get(var.as_tensor()).unwrap().clone()))
                .collect::<Vec<_>>()
        };
        let (ours, theirs) = (gradients(&mut held), gradients(&mut rounded));
        assert_eq!(ours.len(), theirs.len());
        for ((name, ours), (_, theirs)) in ours.iter().zip(&theirs) {
            let scale = theirs
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(scale > 0.0, "{family} {name}: zero gradient");
            let difference = max_abs_diff(ours, theirs);
            assert!(
                difference <= 1e-4 * scale,
                "{family} {name}: {difference} of {scale}"
            );
        }
        let error = held.make_base_trainable().unwrap_err().to_string();
        assert!(
            error.contains("trains through LoRA adapters only"),
            "{error}"
        );
    }
}

/// Evaluation runs its blocks with the adapters detached (no graph) and
/// still applies them: its loss and arg-maxes are those of the training
/// path and of the logits, for a trained adapter in every family.
#[test]
fn evaluation_with_an_adapter_gives_the_training_paths_loss_and_arg_maxes() {
    // Two threads: evaluation splits the batch's two rows between them,
    // where the training path runs them together.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(evaluation_matches_the_training_path);
}

fn evaluation_matches_the_training_path() {
    for family in FAMILIES {
        let mut model = family_model(family, DType::F32);
        let (batch, mask, labels) = two_blocks(family);
        let (base_loss, _, _) = model
            .eval_loss_sum_and_predictions(&batch, &mask, &labels)
            .unwrap();
        model
            .load_adapter(&fixture_of(family).join("lora_final"))
            .unwrap();
        let (loss, count, predictions) = model
            .eval_loss_sum_and_predictions(&batch, &mask, &labels)
            .unwrap();
        let (trained, trained_count) = model.loss_sum(&batch, &mask, &labels).unwrap();
        let trained = trained.to_scalar::<f32>().unwrap() as f64;
        assert_eq!(count, trained_count, "{family}");
        assert!(
            (loss - trained).abs() <= 1e-5 * trained.abs(),
            "{family}: {loss} vs {trained}"
        );
        assert!(
            (loss - base_loss).abs() > 1e-4 * loss.abs(),
            "{family}: the adapter applies"
        );
        let logits = model.forward(&batch, &mask).unwrap();
        let arg_maxes = logits.argmax(2).unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(predictions, arg_maxes, "{family}");
    }
}
