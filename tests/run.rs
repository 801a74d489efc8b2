//! `pt-host run` end to end on the bloom-tiny fixture: HF + PEFT's LoRA run
//! reproduced from the command line, evaluation, checkpoints and resume.

#[path = "support/bloom_tiny.rs"]
mod bloom_tiny;
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bloom_tiny::{FAMILIES, fixture, fixture_of};
use common::{PtHost, arg, assert_ok, fixture_model, json, words};

/// `train/train.txt` and `valid/valid.txt` of the fixture, as corpus dirs.
fn corpus(dir: &Path) -> (PathBuf, PathBuf) {
    let (train, valid) = (dir.join("train"), dir.join("valid"));
    fs::create_dir_all(&train).unwrap();
    fs::create_dir_all(&valid).unwrap();
    fs::copy(fixture().join("train.txt"), train.join("train.txt")).unwrap();
    fs::copy(fixture().join("valid.txt"), valid.join("valid.txt")).unwrap();
    (train, valid)
}

/// `run` on the fixture corpus into `dir/output`, with `extra` flags.
fn run_args(dir: &Path, output: &str, extra: &[&str]) -> Vec<String> {
    run_args_of(&fixture_model(), dir, output, extra)
}

/// [`run_args`] with the model in `model_dir`.
fn run_args_of(model_dir: &Path, dir: &Path, output: &str, extra: &[&str]) -> Vec<String> {
    let (train, valid) = corpus(dir);
    [
        "run",
        "--model_name_or_path",
        model_dir.to_str().unwrap(),
        "--train_file_dir",
        train.to_str().unwrap(),
        "--validation_file_dir",
        valid.to_str().unwrap(),
        "--output_dir",
        dir.join(output).to_str().unwrap(),
        "--cache_dir",
        dir.join("cache").to_str().unwrap(),
        "--block_size",
        "32",
        "--disable_tqdm",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

fn run(dir: &Path, output: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pt-host"))
        .args(run_args(dir, output, extra))
        .output()
        .unwrap()
}

fn adapter(path: &Path) -> Vec<(String, Vec<f32>)> {
    let tensors = candle_core::safetensors::load(
        path.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut named: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// The recipe of `trajectory.json`, from the command line.
const RECIPE: &[&str] = &[
    "--do_train",
    "--do_eval",
    "--shuffle",
    "false",
    "--per_device_train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "2",
    "--learning_rate",
    "1e-2",
    "--weight_decay",
    "0.01",
    "--max_steps",
    "6",
    "--warmup_steps",
    "2",
    "--lora_dropout",
    "0",
    "--logging_steps",
    "1",
];

#[test]
fn the_peft_trajectory_is_reproduced_from_the_command_line() {
    follow_peft(&[]);
}

#[test]
fn the_peft_trajectory_is_reproduced_with_gradient_checkpointing() {
    follow_peft(&["--gradient_checkpointing"]);
}

/// Llama, Mistral, Qwen2 and Qwen3 through `pt-host run` (`--model_type
/// auto` reading each config.json).
#[test]
fn every_family_follows_peft_from_the_command_line() {
    for family in &FAMILIES[1..] {
        follow_peft_of(family, &[]);
    }
}

fn follow_peft(extra: &[&str]) {
    follow_peft_of("bloom", extra);
}

fn follow_peft_of(family: &str, extra: &[&str]) {
    let checkpointing = extra.contains(&"--gradient_checkpointing");
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture_of(family);
    let init = fixture.join("lora_init");
    let args = [RECIPE, &["--peft_path", init.to_str().unwrap()], extra].concat();
    let output = PtHost::new(run_args_of(
        &fixture.join("model"),
        dir.path(),
        "out",
        &args,
    ))
    .output();
    assert_ok(&output);
    let out = dir.path().join("out");
    let said = String::from_utf8_lossy(&output.stderr).contains("block activations are recomputed");
    assert_eq!(said, checkpointing);
    let expected = json(&fixture.join("trajectory.json"));
    let state = json(&out.join("trainer_state.json"));
    let train_logs: Vec<&serde_json::Value> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("loss").is_some())
        .collect();
    assert_eq!(train_logs.len(), 6);
    for (ours, theirs) in train_logs.iter().zip(expected["log"].as_array().unwrap()) {
        for key in ["loss", "grad_norm"] {
            let (a, b) = (ours[key].as_f64().unwrap(), theirs[key].as_f64().unwrap());
            assert!(
                ((a - b) / b).abs() < 1e-4,
                "{family} step {}: {key} {a} vs {b}",
                theirs["step"]
            );
        }
        assert!(
            (ours["learning_rate"].as_f64().unwrap() - theirs["learning_rate"].as_f64().unwrap())
                .abs()
                < 1e-12
        );
        assert_eq!(ours["step"], theirs["step"]);
    }
    let eval = json(&out.join("eval_results.json"));
    let (ours, theirs) = (
        eval["eval_loss"].as_f64().unwrap(),
        expected["valid_loss_after"].as_f64().unwrap(),
    );
    assert!(
        ((ours - theirs) / theirs).abs() < 1e-4,
        "{family}: eval_loss {ours} vs {theirs}"
    );
    assert!((eval["perplexity"].as_f64().unwrap() - ours.exp()).abs() < 1e-9);
    for ((name, ours), (_, theirs)) in adapter(&out)
        .iter()
        .zip(adapter(&fixture.join("lora_final")))
    {
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{family} {name}: {worst}");
    }
    // PEFT reads the adapter we wrote to the loss we measured.
    if family != "bloom" && common::python_has("our adapter of every family in PEFT") {
        let theirs = common::hf_eval_loss(&fixture.join("model"), Some(&out));
        assert!(
            ((theirs - ours) / ours).abs() < 1e-5,
            "{family}: PEFT {theirs}, pt-host {ours}"
        );
    }
    let config = json(&out.join("adapter_config.json"));
    assert_eq!(
        (
            config["peft_type"].as_str(),
            config["r"].as_u64(),
            config["task_type"].as_str()
        ),
        (Some("LORA"), Some(8), Some("CAUSAL_LM"))
    );
    let leftovers: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging files left behind: {leftovers:?}"
    );
    for file in [
        "train_results.json",
        "all_results.json",
        "trainer_log.jsonl",
        "data_report.json",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
}

#[test]
fn eval_only_with_an_adapter_matches_hf() {
    let dir = tempfile::tempdir().unwrap();
    let final_adapter = fixture().join("lora_final");
    let output = run(
        dir.path(),
        "eval",
        &["--do_eval", "--peft_path", final_adapter.to_str().unwrap()],
    );
    assert_ok(&output);
    let eval = json(&dir.path().join("eval/eval_results.json"));
    let theirs = json(&fixture().join("trajectory.json"))["valid_loss_after"]
        .as_f64()
        .unwrap();
    let ours = eval["eval_loss"].as_f64().unwrap();
    assert!(
        ((ours - theirs) / theirs).abs() < 1e-5,
        "{ours} vs {theirs}"
    );
    assert!(
        !dir.path().join("eval/adapter_model.safetensors").exists(),
        "eval-only writes no adapter"
    );
}

/// A Llama-family run (Qwen3's fixture: GQA, q/k norms; LoRA with dropout
/// on every linear layer) resumed from a checkpoint ends bit for bit where
/// the uninterrupted run ends.
/// `extend-tokenizer` on the shipped corpus with `model`'s tokenizer, into
/// `dir/name`; returns that directory and the command's stdout.
fn extend_tokenizer(model: &Path, dir: &Path, name: &str) -> (PathBuf, String) {
    let out = dir.join(name);
    let output = PtHost::new(["extend-tokenizer", "--num_new_tokens", "200"])
        .arg("--model_name_or_path")
        .arg(model)
        .arg("--train_file_dir")
        .arg(common::repo().join("data/pretrain"))
        .arg("--output_dir")
        .arg(&out)
        .succeeds();
    (out, String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A run with an extended vocabulary (and its new rows trained) resumes
/// bit-identically too.
#[test]
fn a_resumed_llama_family_run_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_of("qwen3").join("model");
    let (tokenizer, _) = extend_tokenizer(&model, dir.path(), "tokenizer");
    let tokenizer = tokenizer.display().to_string();
    let mut recipe = words(
        "--do_train --per_device_train_batch_size 4 --learning_rate 5e-3 --max_steps 8 \
         --save_steps 4 --logging_steps 4 --lora_dropout 0.1 --seed 7 --modules_to_save embed_tokens",
    );
    recipe.extend(["--tokenizer_name_or_path", &tokenizer]);
    let run_into = |output: &str, extra: &[&str]| {
        let args = run_args_of(&model, dir.path(), output, &[&recipe[..], extra].concat());
        PtHost::new(args).succeeds()
    };
    run_into("straight", &[]);
    run_into("resumed", &[]);
    let resumed = dir.path().join("resumed");
    fs::remove_dir_all(resumed.join("checkpoint-8")).unwrap();
    fs::remove_file(resumed.join("adapter_model.safetensors")).unwrap();
    let again = run_into("resumed", &["--resume_from_checkpoint", "true"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("checkpoint-4 at step 4"));
    let straight = adapter(&dir.path().join("straight"));
    assert!(
        straight
            .iter()
            .any(|(name, _)| name.ends_with("embed_tokens.weight"))
    );
    assert_eq!(straight, adapter(&resumed));
}

/// Training a grown vocabulary follows PEFT step by step: from the same
/// start (the fixture's LoRA init, new rows at the mean, PEFT's
/// `modules_to_save` with tying on a tied model), six steps' loss and
/// gradient norm and the final eval loss within 1e-4, for a tied Qwen3 and
/// an untied Llama.
#[test]
fn a_grown_vocabulary_trains_as_peft_trains_it() {
    if !common::python_has("modules_to_save trajectories against PEFT") {
        return;
    }
    for (family, modules) in [("qwen3", "embed_tokens"), ("llama", "embed_tokens,lm_head")] {
        let dir = tempfile::tempdir().unwrap();
        let fixture = fixture_of(family);
        let (tokenizer, _) = extend_tokenizer(&fixture.join("model"), dir.path(), "tokenizer");
        let reference = dir.path().join("peft");
        let made = Command::new("python3")
            .arg(common::repo().join("tests/python/vocab_trajectory.py"))
            .args([&fixture, &tokenizer])
            .arg(modules)
            .arg(&reference)
            .output()
            .unwrap();
        assert_ok(&made);
        let init = reference.join("init");
        let args = [
            RECIPE,
            &["--peft_path", init.to_str().unwrap()],
            &["--tokenizer_name_or_path", tokenizer.to_str().unwrap()],
        ]
        .concat();
        let output = PtHost::new(run_args_of(
            &fixture.join("model"),
            dir.path(),
            "out",
            &args,
        ))
        .succeeds();
        let expected = json(&reference.join("trajectory.json"));
        let trainable = format!("trainable params: {} ", expected["trainable"]);
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(&trainable),
            "{family}"
        );
        let state = json(&dir.path().join("out/trainer_state.json"));
        let steps: Vec<&serde_json::Value> = state["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.get("loss").is_some())
            .collect();
        assert_eq!(steps.len(), 6);
        for (ours, theirs) in steps.iter().zip(expected["log"].as_array().unwrap()) {
            for key in ["loss", "grad_norm", "learning_rate"] {
                let (a, b) = (ours[key].as_f64().unwrap(), theirs[key].as_f64().unwrap());
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs(),
                    "{family} step {}: {key} {a} vs {b}",
                    theirs["step"]
                );
            }
        }
        let ours = json(&dir.path().join("out/eval_results.json"))["eval_loss"]
            .as_f64()
            .unwrap();
        let theirs = expected["valid_loss_after"].as_f64().unwrap();
        assert!(
            ((ours - theirs) / theirs).abs() < 1e-4,
            "{family}: eval_loss {ours} vs {theirs}"
        );
    }
}

/// The vocabulary-extension path end to end, for a tied BLOOM, an untied
/// Llama whose head is left frozen, and a tied Qwen3: domain tokens learnt
/// on the shipped corpus (old ids unchanged, fewer tokens per character),
/// their rows grown and trained through modules_to_save, the merge, and
/// transformers (merged model) and PEFT (adapter on a resized base) giving
/// our eval loss on the ids AutoTokenizer produces.
#[test]
fn an_extended_vocabulary_trains_merges_and_loads_in_transformers() {
    for (family, modules) in [
        ("bloom", "word_embeddings"),
        ("llama", "embed_tokens"),
        ("qwen3", "embed_tokens,lm_head"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = fixture_of(family).join("model");
        let (tokenizer, said) = extend_tokenizer(&model, dir.path(), "tokenizer");
        assert!(said.contains("tokens per character on this text"), "{said}");
        let report = json(&tokenizer.join("vocab_report.json"));
        let (before, after) = (&report["before"], &report["after"]);
        assert!(
            after["tokens"].as_u64() < before["tokens"].as_u64(),
            "{report}"
        );
        let base_vocab = &json(&model.join("tokenizer.json"))["model"]["vocab"];
        assert_eq!(
            &json(&tokenizer.join("tokenizer.json"))["model"]["vocab"],
            base_vocab
        );
        let added = report["new_tokens"].as_array().unwrap().len();
        assert!(added > 100, "{added} tokens");
        let rows = 2000 + added;

        let refused = PtHost::new(run_args_of(&model, dir.path(), "refused", &["--do_train"]))
            .args(["--tokenizer_name_or_path", tokenizer.to_str().unwrap()])
            .fails_with("train the added tokens' rows");
        assert!(refused.contains("--modules_to_save"), "{refused}");
        let args = [
            "--do_train",
            "--do_eval",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-2",
            "--modules_to_save",
            modules,
            "--tokenizer_name_or_path",
            tokenizer.to_str().unwrap(),
        ];
        let trained = PtHost::new(run_args_of(&model, dir.path(), "out", &args)).succeeds();
        let grew = format!("vocabulary: 2000 → {rows} rows");
        assert!(
            String::from_utf8_lossy(&trained.stderr).contains(&grew),
            "{family}"
        );
        let out = dir.path().join("out");
        let config = json(&out.join("adapter_config.json"));
        assert_eq!(config["ensure_weight_tying"], family != "llama", "{family}");
        let saved = adapter(&out);
        for key in ["lm_head.weight", "embed"] {
            let (_, values) = saved.iter().find(|(name, _)| name.contains(key)).unwrap();
            assert_eq!(values.len(), rows * 64, "{family} {key}");
        }
        let ours = json(&out.join("eval_results.json"))["eval_loss"]
            .as_f64()
            .unwrap();

        let merged = dir.path().join("merged");
        PtHost::new(["merge", "--model_name_or_path", model.to_str().unwrap()])
            .args(["--peft_path", out.to_str().unwrap(), "--output_dir"])
            .arg(&merged)
            .succeeds();
        assert_eq!(json(&merged.join("config.json"))["vocab_size"], rows);
        let (_, valid) = corpus(dir.path());
        PtHost::new(["eval", "--model_name_or_path", merged.to_str().unwrap()])
            .args([
                "--validation_file_dir",
                valid.to_str().unwrap(),
                "--block_size",
                "32",
            ])
            .args(["--output_dir", dir.path().join("eval").to_str().unwrap()])
            .args([
                "--cache_dir",
                dir.path().join("eval-cache").to_str().unwrap(),
            ])
            .succeeds();
        let again = json(&dir.path().join("eval/eval_results.json"))["eval_loss"]
            .as_f64()
            .unwrap();
        assert!(
            ((again - ours) / ours).abs() < 1e-6,
            "{family}: merged {again}, adapter {ours}"
        );

        if !common::python_has("an extended vocabulary in transformers and PEFT") {
            continue;
        }
        let blocks = fs::read_dir(dir.path().join("cache/datasets"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("store.json").is_file())
            .expect("the prepared validation blocks");
        let valid_txt = valid.join("valid.txt");
        // Full fine-tuning grows the vocabulary too, and writes it.
        let full_args = [
            "--do_train",
            "--do_eval",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--use_peft",
            "false",
            "--tokenizer_name_or_path",
            tokenizer.to_str().unwrap(),
        ];
        PtHost::new(run_args_of(&model, dir.path(), "full", &full_args)).succeeds();
        let full = dir.path().join("full");
        assert_eq!(json(&full.join("config.json"))["vocab_size"], rows);
        let full_loss = json(&full.join("eval_results.json"))["eval_loss"]
            .as_f64()
            .unwrap();
        for (model_dir, adapter_dir, ours) in [
            (&merged, None, ours),
            (&model, Some(&out), ours),
            (&full, None, full_loss),
        ] {
            let tokenizer_dir = adapter_dir.unwrap_or(model_dir);
            let output = Command::new("python3")
                .arg(common::repo().join("tests/python/hf_vocab_eval.py"))
                .args([model_dir, tokenizer_dir, &blocks, &valid_txt])
                .args(adapter_dir)
                .output()
                .unwrap();
            assert_ok(&output);
            let theirs: serde_json::Value =
                serde_json::from_slice(output.stdout.trim_ascii()).unwrap();
            assert_eq!(
                theirs["same_ids"], true,
                "{family}: AutoTokenizer's ids differ from ours"
            );
            assert_eq!(theirs["vocab_size"], rows);
            let loss = theirs["eval_loss"].as_f64().unwrap();
            assert!(
                ((loss - ours) / ours).abs() < 1e-5,
                "{family}: HF {loss}, pt-host {ours}"
            );
        }
    }
}

#[test]
fn resuming_from_a_checkpoint_ends_where_an_uninterrupted_run_ends() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = [
        "--do_train",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "5e-3",
        "--max_steps",
        "12",
        "--save_steps",
        "4",
        "--logging_steps",
        "4",
        "--seed",
        "7",
    ];
    let straight = run(dir.path(), "straight", &recipe);
    assert_ok(&straight);
    let resumed_dir = dir.path().join("resumed");
    let first = run(dir.path(), "resumed", &recipe);
    assert!(first.status.success());
    // Pretend the run died after checkpoint-8: only what existed then remains.
    fs::remove_dir_all(resumed_dir.join("checkpoint-12")).unwrap();
    fs::remove_file(resumed_dir.join("adapter_model.safetensors")).unwrap();
    let again = run(
        dir.path(),
        "resumed",
        &[&recipe[..], &["--resume_from_checkpoint", "true"]].concat(),
    );
    assert_ok(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("checkpoint-8 at step 8"));
    assert_eq!(adapter(&dir.path().join("straight")), adapter(&resumed_dir));
    let state = json(&resumed_dir.join("trainer_state.json"));
    assert_eq!(state["global_step"], 12);
    let steps: Vec<u64> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        [4, 8, 12],
        "the log continues from the checkpoint's history"
    );
    // save_total_limit keeps the newest.
    let limited = run(
        dir.path(),
        "limited",
        &[&recipe[..], &["--save_total_limit", "1"]].concat(),
    );
    assert!(limited.status.success());
    let kept: Vec<String> = fs::read_dir(dir.path().join("limited"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(kept, ["checkpoint-12"]);
}

#[test]
fn run_errors_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let nothing = run(dir.path(), "x", &[]);
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("pass --do_train and/or --do_eval"));
    let modules = run(
        dir.path(),
        "x",
        &["--do_train", "--target_modules", "q_proj,v_proj"],
    );
    assert!(
        String::from_utf8_lossy(&modules.stderr)
            .contains("--target_modules: `q_proj` is not a linear layer of a bloom model")
    );
    let resume = run(
        dir.path(),
        "x",
        &words("--do_train --resume_from_checkpoint true --max_steps 1"),
    );
    assert!(
        String::from_utf8_lossy(&resume.stderr)
            .contains("--resume_from_checkpoint true: no checkpoint-N in")
    );
    let no_eval_blocks = run(dir.path(), "y", &["--do_eval", "--max_eval_samples", "0"]);
    assert!(
        String::from_utf8_lossy(&no_eval_blocks.stderr)
            .contains("--do_eval: there are no validation blocks"),
        "{}",
        String::from_utf8_lossy(&no_eval_blocks.stderr)
    );
    for (modules, expected) in [
        (
            "--modules_to_save word_embeddings --use_peft false",
            "--modules_to_save goes with a new adapter",
        ),
        (
            "--modules_to_save embed_tokens",
            "modules_to_save `embed_tokens` matches no module of this bloom model (its embedding is `word_embeddings`",
        ),
        (
            "--modules_to_save dense",
            "modules_to_save `transformer.h.0.self_attention.dense` also has a LoRA adapter",
        ),
        (
            "--mix_weights 0.8,0.2",
            "--mix_weights weighs several --train_file_dir sources, and one is given",
        ),
    ] {
        let args = [&["--do_train"][..], &words(modules)].concat();
        PtHost::new(run_args(dir.path(), "modules", &args)).fails_with(expected);
    }
    // Task files are read and checked before any training.
    let tasks = common::repo().join("tests/fixtures/mc-tasks");
    let zh = tasks.join("zh").display().to_string();
    for (tasks, expected) in [
        (
            "no/such/task",
            "--eval_tasks: no/such/task: no such task file or directory".to_string(),
        ),
        (
            zh.as_str(),
            "--eval_tasks: task zh: subject clinical_medicine has 2 dev examples, fewer than --eval_num_fewshot 3".to_string(),
        ),
    ] {
        let args = ["--do_train", "--eval_tasks", tasks, "--eval_num_fewshot", "3"];
        PtHost::new(run_args(dir.path(), "tasks", &args)).fails_with(&expected);
    }
    // The report's flags belong to `eval`, the general corpus to the report.
    let base = fixture_model().display().to_string();
    let args = ["--do_train", "--base_model_name_or_path", base.as_str()];
    PtHost::new(run_args(dir.path(), "report", &args)).fails_with(
        "--base_model_name_or_path compares a trained model with its base: it is pt-host eval's",
    );
    let mut args = run_args(dir.path(), "report", &["--general_file_dir", base.as_str()]);
    args[0] = "eval".into();
    PtHost::new(args).fails_with(
        "--general_file_dir is the forgetting check of pt-host eval --base_model_name_or_path BASE",
    );
    let cuda = run(dir.path(), "x", &["--do_train", "--device_map", "cuda"]);
    assert!(
        String::from_utf8_lossy(&cuda.stderr)
            .contains("built without CUDA; rebuild with `cargo build --release --features cuda`")
    );
}

#[test]
fn metric_plugins_score_the_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = common::component("domain_terms");
    let final_adapter = fixture().join("lora_final");
    let output = run(
        dir.path(),
        "eval",
        &[
            "--do_eval",
            "--peft_path",
            final_adapter.to_str().unwrap(),
            "--plugin",
            plugin.to_str().unwrap(),
            "--plugin_config",
            r#"domain_terms={"terms":["the","的"]}"#,
            "--report_to",
            "tensorboard",
            "--logging_dir",
            dir.path().join("tb").to_str().unwrap(),
        ],
    );
    assert_ok(&output);
    let eval = json(&dir.path().join("eval/eval_results.json"));
    if let Some(scalars) = tensorboard_scalars(&dir.path().join("tb")) {
        // Plugin metrics are TensorBoard curves like HF's own.
        let recall = scalars["eval/term_recall"][0][1].as_f64().unwrap();
        assert!((recall - eval["eval_term_recall"].as_f64().unwrap()).abs() < 1e-6);
    }

    // The reference side, counted here from the packed validation blocks.
    let tokenizer = pt_data::Tokenizer::from_dir(&fixture_model()).unwrap();
    let blocks = bloom_tiny::packed("valid.txt", 32);
    let occurrences: usize = (0..blocks.len())
        .map(|i| {
            let text = tokenizer.decode(&blocks.row(i)).unwrap().to_lowercase();
            text.matches("the").count() + text.matches("的").count()
        })
        .sum();
    assert!(occurrences > 0);
    assert_eq!(
        eval["eval_term_occurrences"].as_f64().unwrap(),
        occurrences as f64
    );
    let recall = eval["eval_term_recall"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&recall), "{recall}");
}

#[test]
fn epochs_fractional_epochs_and_epoch_logging() {
    let dir = tempfile::tempdir().unwrap();
    // 262 blocks, micro-batch 64: 5 micro-batches, so 5 optimizer steps an epoch.
    let base = [
        "--do_train",
        "--per_device_train_batch_size",
        "64",
        "--save_strategy",
        "no",
        "--learning_rate",
        "1e-3",
    ];
    let two = run(
        dir.path(),
        "two",
        &[
            &base[..],
            &["--num_train_epochs", "2", "--logging_strategy", "epoch"],
        ]
        .concat(),
    );
    assert_ok(&two);
    let state = json(&dir.path().join("two/trainer_state.json"));
    let logged: Vec<(u64, f64)> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["step"].as_u64().unwrap(), e["epoch"].as_f64().unwrap()))
        .collect();
    assert_eq!(logged, [(5, 1.0), (10, 2.0)]);
    assert!(
        !dir.path().join("two/checkpoint-5").exists(),
        "--save_strategy no"
    );
    let half = run(
        dir.path(),
        "half",
        &[
            &base[..],
            &["--num_train_epochs", "0.5", "--logging_steps", "1"],
        ]
        .concat(),
    );
    assert!(half.status.success());
    assert_eq!(
        json(&dir.path().join("half/trainer_state.json"))["global_step"],
        3,
        "ceil(0.5 × 5)"
    );
}

#[test]
fn full_fine_tuning_writes_a_model_that_loads_and_evaluates_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let trained = run(
        dir.path(),
        "full",
        &words(
            "--use_peft false --do_train --do_eval --max_steps 4 --learning_rate 1e-3 --weight_decay 0.01 --per_device_train_batch_size 4 --save_steps 2",
        ),
    );
    assert_ok(&trained);
    let out = dir.path().join("full");
    assert!(String::from_utf8_lossy(&trained.stderr).contains("trainable%: 100.0000"));
    for file in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "checkpoint-2/model.safetensors",
        "checkpoint-4/optimizer.safetensors",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    assert!(!out.join("adapter_model.safetensors").exists());
    let after = json(&out.join("eval_results.json"))["eval_loss"]
        .as_f64()
        .unwrap();
    let before = json(&fixture().join("trajectory.json"))["valid_loss_before"]
        .as_f64()
        .unwrap();
    assert!(
        after < before,
        "training lowered the validation loss: {before} -> {after}"
    );

    // The saved directory is a model of its own: evaluating it gives the same loss.
    let (_, valid) = corpus(dir.path());
    let output = Command::new(env!("CARGO_BIN_EXE_pt-host"))
        .args([
            "run",
            "--do_eval",
            "--model_name_or_path",
            out.to_str().unwrap(),
        ])
        .args([
            "--train_file_dir",
            valid.to_str().unwrap(),
            "--validation_file_dir",
            valid.to_str().unwrap(),
        ])
        .args([
            "--output_dir",
            dir.path().join("reeval").to_str().unwrap(),
            "--block_size",
            "32",
            "--disable_tqdm",
        ])
        .args(["--cache_dir", dir.path().join("cache").to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&output);
    let again = json(&dir.path().join("reeval/eval_results.json"))["eval_loss"]
        .as_f64()
        .unwrap();
    assert!((again - after).abs() < 1e-6, "{after} vs {again}");
}

/// The seed article's command, verbatim but for local paths (a model dir for
/// the hub id) and `--max_steps` to keep it short.
#[test]
fn the_seed_command_runs_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = common::component("medical_clean");
    let data = common::repo().join("data/pretrain");
    let command = format!(
        "run --plugin {} --model_type bloom --model_name_or_path {} --train_file_dir {data} --validation_file_dir {data} \
         --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --do_train --do_eval --use_peft True --seed 42 \
         --max_train_samples 10000 --max_eval_samples 10 --num_train_epochs 0.5 --learning_rate 2e-4 --warmup_ratio 0.05 \
         --weight_decay 0.01 --logging_strategy steps --logging_steps 10 --eval_steps 50 --evaluation_strategy steps \
         --save_steps 500 --save_strategy steps --save_total_limit 13 --gradient_accumulation_steps 1 \
         --preprocessing_num_workers 10 --block_size 512 --group_by_length True --output_dir outputs-pt-bloom-v1 \
         --overwrite_output_dir --ddp_timeout 30000 --logging_first_step True --target_modules all --lora_rank 8 \
         --lora_alpha 16 --lora_dropout 0.05 --torch_dtype bfloat16 --device_map auto --report_to tensorboard \
         --ddp_find_unused_parameters False --gradient_checkpointing True --cache_dir ./cache --max_steps 2",
        plugin.display(),
        fixture_model().display(),
        data = data.display()
    );
    let output = Command::new(env!("CARGO_BIN_EXE_pt-host"))
        .args(command.split_whitespace())
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--ddp_find_unused_parameters is ignored"),
        "{stderr}"
    );
    assert!(stderr.contains("tensorboard: "), "{stderr}");
    assert!(
        stderr.contains("float32"),
        "says it trains in float32 on CPU: {stderr}"
    );
    let out = dir.path().join("outputs-pt-bloom-v1");
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "trainer_state.json",
        "all_results.json",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let eval = json(&out.join("eval_results.json"));
    assert_eq!(eval["eval_samples"], 10);
    let state = json(&out.join("trainer_state.json"));
    assert_eq!(state["log_history"][0]["step"], 1, "--logging_first_step");
    assert!(dir.path().join("cache/datasets").is_dir());
    // HF's default logging_dir: runs/MON-DD_HH-MM-SS_HOST/events.out.tfevents.*
    let runs: Vec<_> = fs::read_dir(out.join("runs")).unwrap().collect();
    assert_eq!(runs.len(), 1);
    let events = fs::read_dir(runs[0].as_ref().unwrap().path())
        .unwrap()
        .count();
    assert_eq!(events, 1);
}

/// Progress: a live bar (loss, learning rate, tokens/s, ETA) on a terminal,
/// checked under a pseudo-terminal (`script`); plain lines otherwise.
#[test]
fn training_shows_progress_on_a_terminal_and_plain_lines_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let (train, valid) = corpus(dir.path());
    let command = format!(
        "{} run --model_name_or_path {} --train_file_dir {} --validation_file_dir {} --output_dir {} \
         --cache_dir {} --block_size 32 --do_train --max_steps 12 --logging_steps 6 --do_eval \
         --eval_strategy steps --eval_steps 6 --per_device_eval_batch_size 1",
        env!("CARGO_BIN_EXE_pt-host"),
        fixture_model().display(),
        train.display(),
        valid.display(),
        dir.path().join("tty").display(),
        dir.path().join("cache").display()
    );
    let plain = Command::new("sh")
        .args(["-c", &command.replace("tty", "plain")])
        .output()
        .unwrap();
    assert_ok(&plain);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("train: step 1/12  loss "), "{stderr}");
    assert!(stderr.contains("train: step 12/12  loss "), "{stderr}");
    assert!(stderr.contains(" tok/s  eta "), "{stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{stderr}"
    );
    // (A later flag overrides an earlier one: no evaluation, so no eval plot.)
    let quiet = Command::new("sh")
        .args([
            "-c",
            &format!(
                "{} --disable_tqdm --do_eval false --plot_loss",
                command.replace("tty", "quiet")
            ),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&quiet.stderr);
    assert_ok(&quiet);
    assert!(!stderr.contains("train: step"), "{stderr}");
    assert!(
        stderr.contains("--plot_loss: no eval_loss was logged; training_eval_loss.png not written"),
        "{stderr}"
    );
    assert!(dir.path().join("quiet/training_loss.png").is_file());

    let Ok(tty) = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
    else {
        assert!(
            std::env::var_os("PT_REQUIRE_TERMINAL").is_none(),
            "PT_REQUIRE_TERMINAL is set but `script` (bsdutils) is missing"
        );
        eprintln!("SKIPPED the terminal form: `script` (bsdutils) is not installed");
        return;
    };
    assert_ok(&tty);
    let screen = String::from_utf8_lossy(&tty.stdout);
    // Redrawn in place: the bar with step, loss, lr, tokens/s and ETA.
    assert!(screen.contains("\r"), "{screen}");
    for part in [
        "train [",
        "/12 loss ",
        " lr ",
        " tok/s eta ",
        "evaluating: batch ",
    ] {
        assert!(
            screen.contains(part),
            "{part:?} not on the terminal: {screen}"
        );
    }
    assert!(
        !screen.contains("train: step"),
        "no plain lines on a terminal"
    );
}

/// Every scalar under `logging_dir` as TensorBoard's own reader sees it
/// (`tests/python/read_tensorboard.py`): `{tag: [[step, value], ...]}`, or
/// `None` (skipped) where the tensorboard package is missing.
fn tensorboard_scalars(logging_dir: &Path) -> Option<serde_json::Value> {
    let available = Command::new("python3")
        .args(["-c", "import tensorboard"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var_os("PT_REQUIRE_TENSORBOARD").is_none(),
            "python3 -m pip install tensorboard"
        );
        eprintln!("SKIPPED TensorBoard read-back: the tensorboard Python package is not installed");
        return None;
    }
    let read = Command::new("python3")
        .arg(common::repo().join("tests/python/read_tensorboard.py"))
        .arg(logging_dir)
        .output()
        .unwrap();
    assert_ok(&read);
    Some(serde_json::from_slice(&read.stdout).unwrap())
}

/// The events as TensorBoard reads them: HF's tags, the logged steps and
/// values, and the data report's counts at step 0.
#[test]
fn tensorboard_events_read_back_with_tensorboards_own_reader() {
    let dir = tempfile::tempdir().unwrap();
    let logging_dir = dir.path().join("tb");
    let output = run(
        dir.path(),
        "out",
        &[
            "--do_train",
            "--do_eval",
            "--max_steps",
            "6",
            "--per_device_train_batch_size",
            "2",
            "--logging_steps",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "3",
            "--report_to",
            "tensorboard",
            "--logging_dir",
            logging_dir.to_str().unwrap(),
            "--plot_loss",
        ],
    );
    assert_ok(&output);
    // --plot_loss: both curves as 960×600 PNGs.
    for plot in ["training_loss.png", "training_eval_loss.png"] {
        let bytes = fs::read(dir.path().join("out").join(plot)).unwrap();
        assert_eq!(bytes[..8], *b"\x89PNG\r\n\x1a\n", "{plot}");
        assert_eq!(bytes[12..16], *b"IHDR");
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 960);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 600);
    }
    let Some(scalars) = tensorboard_scalars(&logging_dir) else {
        return;
    };
    let curve = |tag: &str| -> Vec<(u64, f64)> {
        scalars[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {scalars}"))
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    };
    let log = fs::read_to_string(dir.path().join("out/trainer_log.jsonl")).unwrap();
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected = |key: &str| -> Vec<(u64, f64)> {
        entries
            .iter()
            .filter(|e| e.get(key).is_some())
            .map(|e| (e["step"].as_u64().unwrap(), e[key].as_f64().unwrap()))
            .collect()
    };
    let close = |tag: &str, key: &str| {
        let (got, want) = (curve(tag), expected(key));
        assert_eq!(got.len(), want.len(), "{tag}: {got:?} vs {want:?}");
        for ((step, value), (want_step, want_value)) in got.iter().zip(&want) {
            assert_eq!(step, want_step, "{tag}");
            // Stored as f32.
            assert!(
                (value - want_value).abs() <= 1e-6 * want_value.abs().max(1e-3),
                "{tag} at {step}: {value} vs {want_value}"
            );
        }
    };
    close("train/loss", "loss");
    close("train/learning_rate", "learning_rate");
    close("train/grad_norm", "grad_norm");
    assert_eq!(
        curve("train/loss").iter().map(|p| p.0).collect::<Vec<_>>(),
        [2, 4, 6]
    );
    assert_eq!(
        curve("eval/loss").iter().map(|p| p.0).collect::<Vec<_>>(),
        [3, 6, 6],
        "evaluations at steps 3 and 6, then the final --do_eval"
    );
    let eval_results = json(&dir.path().join("out/eval_results.json"));
    let last_eval = curve("eval/loss").last().unwrap().1;
    assert!((last_eval - eval_results["eval_loss"].as_f64().unwrap()).abs() < 1e-6);
    let report = json(&dir.path().join("out/data_report.json"));
    assert_eq!(
        curve("data/train_blocks"),
        [(0, report["train"]["blocks"].as_f64().unwrap())]
    );
}

/// `examples/medicalgpt_pretraining.yaml` (the seed command as a recipe) on the
/// fixture model: command-line flags replace the recipe's values.
#[test]
fn the_seed_recipe_runs_with_command_line_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let recipe_run = |extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "run".into(),
            "examples/medicalgpt_pretraining.yaml".into(),
            "--model_name_or_path".into(),
            fixture_model().display().to_string(),
            // The recipe's path assumes the default target directory.
            "--plugin".into(),
            common::component("medical_clean").display().to_string(),
            "--output_dir".into(),
            out.display().to_string(),
            "--cache_dir".into(),
            dir.path().join("cache").display().to_string(),
            "--max_steps=2".into(),
            "--disable_tqdm".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Command::new(env!("CARGO_BIN_EXE_pt-host"))
            .args(&args)
            .current_dir(common::repo())
            .output()
            .unwrap()
    };
    let shown = recipe_run(&["--print_config"]);
    assert_ok(&shown);
    let config = String::from_utf8_lossy(&shown.stdout);
    for line in [
        "learning_rate: 0.0002  # examples/medicalgpt_pretraining.yaml",
        "max_steps: 2  # command line",
        "max_eval_samples: 10  # examples/medicalgpt_pretraining.yaml",
        "lr_scheduler_type: \"linear\"  # default",
        "report_to: \"tensorboard\"  # examples/medicalgpt_pretraining.yaml",
    ] {
        assert!(config.contains(line), "{line:?} not in\n{config}");
    }
    assert!(!out.exists(), "--print_config only prints");
    // The printed configuration is itself a recipe that gives the same configuration.
    let printed = dir.path().join("printed.yaml");
    fs::write(&printed, config.as_bytes()).unwrap();
    let again = Command::new(env!("CARGO_BIN_EXE_pt-host"))
        .args(["run", printed.to_str().unwrap(), "--print_config"])
        .output()
        .unwrap();
    assert_ok(&again);
    // Values without their sources; numbers compared as numbers (1e-8 = 0.00000001).
    let strip = |text: &str| -> Vec<String> {
        text.lines()
            .skip(1)
            .map(|l| {
                let (key, value) = l.split("  # ").next().unwrap().split_once(": ").unwrap();
                match value.parse::<f64>() {
                    Ok(number) => format!("{key}: {number:?}"),
                    Err(_) => format!("{key}: {value}"),
                }
            })
            .collect()
    };
    assert_eq!(
        strip(&String::from_utf8_lossy(&again.stdout)),
        strip(&config)
    );

    assert_ok(&recipe_run(&[]));
    let eval = json(&out.join("eval_results.json"));
    assert_eq!(eval["eval_samples"], 10, "max_eval_samples from the recipe");
    let state = json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 2, "--max_steps from the command line");
    assert_eq!(state["log_history"][0]["step"], 1, "logging_first_step");
    let adapter_config = json(&out.join("adapter_config.json"));
    assert_eq!(adapter_config["r"], 8);
    assert!(out.join("runs").is_dir(), "report_to: tensorboard");
}

#[test]
fn recipe_errors_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let pt_host = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_pt-host"))
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let unknown = write("unknown.yaml", "do_train: true\nlearning_rat: 1e-4\n");
    let message = pt_host(&["run", &unknown]);
    assert!(
        message.contains(&format!(
            "recipe {unknown}: `learning_rat` is not a flag of `pt-host run`"
        )),
        "{message}"
    );
    let malformed = write("malformed.yaml", "do_train: true\n  learning_rate: [1e-4\n");
    let message = pt_host(&["run", &malformed]);
    assert!(
        message.contains(&format!("recipe {malformed}: not valid")),
        "{message}"
    );
    let toml = write("bad.toml", "do_train = \n");
    let message = pt_host(&["run", &toml]);
    assert!(
        message.contains(&format!("recipe {toml}: not valid")),
        "{message}"
    );
    let list = write("list.yaml", "- do_train\n");
    let message = pt_host(&["run", &list]);
    assert!(
        message.contains("expected `flag_name: value` lines"),
        "{message}"
    );
    let value = write("value.json", r#"{"learning_rate": "fast"}"#);
    let message = pt_host(&["run", &value]);
    assert!(
        message.contains("invalid value 'fast' for '--learning_rate"),
        "{message}"
    );
    let missing = dir.path().join("missing.yaml").display().to_string();
    let message = pt_host(&["run", &missing]);
    assert!(
        message.contains(&format!("recipe {missing}: cannot read")),
        "{message}"
    );
}

#[test]
fn a_non_empty_output_dir_needs_overwrite_and_the_model_type_must_match() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("busy")).unwrap();
    fs::write(dir.path().join("busy/notes.txt"), "keep me").unwrap();
    let refused = run(dir.path(), "busy", &["--do_train", "--max_steps", "1"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("exists and is not empty: pass --overwrite_output_dir")
    );
    let allowed = run(
        dir.path(),
        "busy",
        &["--do_train", "--max_steps", "1", "--overwrite_output_dir"],
    );
    assert_ok(&allowed);
    let wrong = run(
        dir.path(),
        "other",
        &["--do_train", "--max_steps", "1", "--model_type", "llama"],
    );
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("--model_type llama, but"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}

/// kill -9 at five moments, each run resuming from the last checkpoint: the
/// same adapter, bit for bit, as a run that was never interrupted, and never
/// a half-written checkpoint.
#[test]
fn a_killed_run_resumes_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = [
        "--do_train",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "5e-3",
        "--max_steps",
        "120",
        "--save_steps",
        "10",
        "--logging_steps",
        "10",
        "--lora_dropout",
        "0.1",
    ];
    let started = std::time::Instant::now();
    let straight = run(dir.path(), "straight", &recipe);
    assert_ok(&straight);
    let duration = started.elapsed();

    let (train, valid) = corpus(dir.path());
    let killed_dir = dir.path().join("killed");
    let command = |resume: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pt-host"));
        command
            .args(["run", "--model_name_or_path"])
            .arg(fixture_model())
            .arg("--train_file_dir")
            .arg(&train)
            .arg("--validation_file_dir")
            .arg(&valid)
            .arg("--output_dir")
            .arg(&killed_dir)
            .arg("--cache_dir")
            .arg(dir.path().join("cache"))
            .args([
                "--block_size",
                "32",
                "--disable_tqdm",
                "--overwrite_output_dir",
            ])
            .args(recipe);
        if resume {
            command.args(["--resume_from_checkpoint", "true"]);
        }
        command
    };
    let has_checkpoint = || pt_train::list_checkpoints(&killed_dir).is_ok_and(|c| !c.is_empty());
    // Five SIGKILLs at pseudo-random moments (a fixed xorshift, so a failure
    // reproduces), each run resuming from whatever the last one left.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    for _ in 0..5 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // Within a fifth of a whole run: five such runs cannot finish the
        // work (each resumes from the last checkpoint), so each is interrupted.
        let fraction = (state % 1000) as f64 / 1000.0 / 5.0;
        let mut child = command(has_checkpoint())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(duration.mul_f64(fraction));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        // Whatever the moment, every checkpoint-N/ present is complete.
        for (step, checkpoint) in pt_train::list_checkpoints(&killed_dir).unwrap_or_default() {
            let state = json(&checkpoint.join("trainer_state.json"));
            assert_eq!(state["global_step"], step);
            assert!(checkpoint.join("adapter_model.safetensors").is_file());
            assert!(checkpoint.join("optimizer.safetensors").is_file());
        }
    }
    assert!(kills >= 4, "only {kills} of 5 runs were interrupted");
    // A loaded machine may have killed every run before its first checkpoint.
    let resumed = command(has_checkpoint()).output().unwrap();
    assert_ok(&resumed);
    assert_eq!(adapter(&dir.path().join("straight")), adapter(&killed_dir));
}

/// Our adapter in Python PEFT gives our eval loss. Runs where torch,
/// transformers and PEFT are installed; says so plainly where they are not.
#[test]
fn the_adapter_loads_in_python_peft_with_the_same_eval_loss() {
    if !common::python_has("the_adapter_loads_in_python_peft_with_the_same_eval_loss") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trained = run(
        dir.path(),
        "out",
        &words(
            "--do_train --do_eval --max_steps 5 --learning_rate 1e-2 --per_device_train_batch_size 4 --lora_rank 4 --target_modules query_key_value,dense_4h_to_h",
        ),
    );
    assert_ok(&trained);
    let ours = json(&dir.path().join("out/eval_results.json"))["eval_loss"]
        .as_f64()
        .unwrap();
    let theirs = common::hf_eval_loss(&fixture_model(), Some(&dir.path().join("out")));
    assert!(
        ((ours - theirs) / theirs).abs() < 1e-5,
        "pt-host {ours}, PEFT {theirs}"
    );
}

/// What a fresh adapter trained from the command line with `flags` (4 steps
/// on the fixture) evaluates to everywhere: its output directory, pt-host's
/// eval loss, and the losses of the same adapter merged by `pt-host merge
/// merge_flags` (in pt-host, and in transformers) and unmerged in PEFT
/// (hf_eval.py with `peft_options`), those two where Python has them.
struct RoundTrip {
    dir: tempfile::TempDir,
    said: String,
    ours: f64,
    elsewhere: Vec<(&'static str, f64)>,
}

fn train_and_merge(flags: &str, merge_flags: &[&str], peft_options: &[&str]) -> RoundTrip {
    let dir = tempfile::tempdir().unwrap();
    let recipe = "--do_train --do_eval --max_steps 4 --learning_rate 1e-2 --per_device_train_batch_size 4 --lora_rank 4";
    let trained = run(dir.path(), "out", &words(&format!("{recipe} {flags}")));
    assert_ok(&trained);
    let out = dir.path().join("out");
    let ours = json(&out.join("eval_results.json"))["eval_loss"]
        .as_f64()
        .unwrap();
    let merged = dir.path().join("merged");
    PtHost::new(["merge", "--model_name_or_path", arg(&fixture_model())])
        .args(["--peft_path", arg(&out), "--output_dir", arg(&merged)])
        .args(merge_flags)
        .succeeds();
    let evaluated = dir.path().join("eval");
    PtHost::new(["eval", "--model_name_or_path", arg(&merged)])
        .args(["--validation_file_dir", arg(&fixture().join("valid.txt"))])
        .args(["--block_size", "32", "--output_dir", arg(&evaluated)])
        .args(["--cache_dir", arg(&dir.path().join("cache"))])
        .succeeds();
    let merged_loss = json(&evaluated.join("eval_results.json"))["eval_loss"]
        .as_f64()
        .unwrap();
    let mut elsewhere = vec![("pt-host merged", merged_loss)];
    if common::python_has("an adapter variant in PEFT and merged in transformers") {
        let peft = common::hf_eval_loss_with(&fixture_model(), Some(&out), peft_options);
        elsewhere.push(("PEFT", peft));
        elsewhere.push(("transformers merged", common::hf_eval_loss(&merged, None)));
    }
    RoundTrip {
        said: String::from_utf8_lossy(&trained.stderr).into_owned(),
        dir,
        ours,
        elsewhere,
    }
}

impl RoundTrip {
    fn agrees_within(&self, relative: f64) {
        for (what, theirs) in &self.elsewhere {
            assert!(
                ((self.ours - theirs) / theirs).abs() < relative,
                "pt-host {}, {what} {theirs}",
                self.ours
            );
        }
    }
}

/// A DoRA adapter with rsLoRA scaling, trained under LoRA+ and with dropout
/// from the command line, is saved as PEFT saves one: PEFT loads it to our
/// eval loss, and `merge` folds it into a model pt-host and transformers
/// evaluate to that loss too.
#[test]
fn a_dora_rslora_adapter_trained_with_loraplus_loads_in_peft_and_merges() {
    let trip = train_and_merge(
        "--lora_dropout 0.1 --use_dora --use_rslora --loraplus_lr_ratio 16",
        &[],
        &[],
    );
    let out = trip.dir.path().join("out");
    let config = json(&out.join("adapter_config.json"));
    assert_eq!(
        (config["use_dora"].as_bool(), config["use_rslora"].as_bool()),
        (Some(true), Some(true))
    );
    let magnitudes = adapter(&out)
        .into_iter()
        .filter(|(name, _)| name.ends_with(".lora_magnitude_vector"))
        .count();
    // One per adapted layer: 4 kinds of layer in each of the 2 blocks.
    assert_eq!(magnitudes, 8);
    trip.agrees_within(1e-5);
}

/// QLoRA from the command line (MedicalGPT's `--qlora`: NF4, double
/// quantisation; bf16 compute): the run says what the base holds, PEFT loads
/// the adapter onto bitsandbytes' 4-bit base to our eval loss, and `merge
/// --qlora` dequantises the base under the merged adapter, to that loss
/// again. Within bf16 rounding (measured: 1.3e-5 relative; the merged model
/// computes in f32).
#[test]
fn a_qlora_adapter_loads_onto_bitsandbytes_base_and_merges() {
    let trip = train_and_merge(
        "--qlora --bnb_4bit_compute_dtype bfloat16",
        &["--qlora"],
        &["--load_in_4bit"],
    );
    assert!(
        trip.said
            .contains("4-bit NF4 base (double quantisation, BF16 compute)"),
        "{}",
        trip.said
    );
    trip.agrees_within(1e-4);
}

/// A base held in bf16 on the CPU (`--frozen_weights bf16`): the run says
/// so, and its adapter gives, in PEFT on a transformers model whose linear
/// weights (all but the LM head) are rounded to bf16 and computed in f32,
/// our eval loss; `merge --frozen_weights bf16` folds it into that rounded
/// base, to that loss again. (On this tiny model the rounding moves the loss
/// by only 9e-7 relative; `pt-model`'s tests show it in the logits.)
#[test]
fn a_bf16_held_base_trains_an_adapter_peft_reproduces_on_the_rounded_base() {
    let trip = train_and_merge(
        "--frozen_weights bf16",
        &["--frozen_weights", "bf16"],
        &["--bf16_linear_weights"],
    );
    assert!(
        trip.said.contains("bf16 base (multiplied in F32)"),
        "{}",
        trip.said
    );
    trip.agrees_within(1e-5);
}

/// A loss that is no longer finite stops the run at that step, naming it and
/// what to do; the checkpoints written before are complete.
#[test]
fn a_diverging_run_stops_naming_the_step_with_checkpoints_intact() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(
        dir.path(),
        "out",
        &words("--do_train --use_peft false --learning_rate 1e30 --max_steps 6 --save_steps 1"),
    );
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    let step = message
        .split("loss is ")
        .nth(1)
        .and_then(|rest| rest.split(" at step ").nth(1))
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no step named: {message}"));
    assert!(step >= 2, "a checkpoint was written before: {message}");
    assert!(message.contains("stopping (the last checkpoint is intact)\nLower --learning_rate"));
    assert!(!message.contains("panicked"), "{message}");
    for n in 1..step {
        let checkpoint = dir.path().join(format!("out/checkpoint-{n}"));
        let state = json(&checkpoint.join("trainer_state.json"));
        assert_eq!(state["global_step"], n);
        assert!(checkpoint.join("model.safetensors").is_file());
    }
    assert!(!dir.path().join(format!("out/checkpoint-{step}")).exists());
}

/// A write that fails while saving a checkpoint (here the file-size limit,
/// as a full disk would) ends the run with which checkpoint and why; the
/// earlier checkpoints stay complete, nothing half-written remains, and the
/// run resumes from the last one. A corrupt checkpoint is refused by name.
#[test]
fn a_failed_checkpoint_write_keeps_the_earlier_ones_and_corrupt_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&run(
        dir.path(),
        "out",
        &["--do_train", "--max_steps", "3", "--save_steps", "1"],
    ));
    // The adapter checkpoint holds files over 64 KiB; the size limit makes
    // writing them fail with EFBIG (SIGXFSZ ignored, as a shell would).
    let (train, valid) = corpus(dir.path());
    let limited = Command::new("sh")
        .args([
            "-c",
            &format!(
                "trap '' XFSZ; ulimit -f 64; exec {} run --model_name_or_path {} --train_file_dir {} \
                 --validation_file_dir {} --output_dir {} --cache_dir {} --block_size 32 --disable_tqdm \
                 --do_train --max_steps 6 --save_steps 1 --resume_from_checkpoint true",
                env!("CARGO_BIN_EXE_pt-host"),
                fixture_model().display(),
                train.display(),
                valid.display(),
                dir.path().join("out").display(),
                dir.path().join("cache").display()
            ),
        ])
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&limited.stderr);
    assert!(!limited.status.success(), "{message}");
    assert!(
        message.contains(
            "checkpoint-4: cannot write the checkpoint (the earlier checkpoints are intact"
        ) && message.contains("File too large"),
        "{message}"
    );
    let out = dir.path().join("out");
    let names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("checkpoint"))
        .collect();
    assert_eq!(
        names.len(),
        3,
        "no checkpoint-4, no staging left: {names:?}"
    );
    assert_eq!(
        json(&out.join("checkpoint-3/trainer_state.json"))["global_step"],
        3
    );

    // Resumed without the limit, the run finishes.
    let resumed = run(
        dir.path(),
        "out",
        &words("--do_train --max_steps 6 --save_steps 1 --resume_from_checkpoint true"),
    );
    assert_ok(&resumed);
    assert_eq!(json(&out.join("trainer_state.json"))["global_step"], 6);

    // Corrupt checkpoints: each refused naming the file, with what to do.
    let corruptions: [(&str, &str, &str); 3] = [
        (
            "checkpoint-6",
            "adapter_model.safetensors",
            "adapter_model.safetensors: corrupt or missing weights",
        ),
        (
            "checkpoint-5",
            "optimizer.safetensors",
            "optimizer.safetensors: corrupt optimizer state",
        ),
        (
            "checkpoint-4",
            "trainer_state.json",
            "trainer_state.json: corrupt trainer state",
        ),
    ];
    for (checkpoint, file, expected) in corruptions {
        let path = out.join(checkpoint).join(file);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let refused = run(
            dir.path(),
            "out",
            &[
                "--do_train",
                "--max_steps",
                "8",
                "--resume_from_checkpoint",
                out.join(checkpoint).to_str().unwrap(),
            ],
        );
        let message = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert!(
            message.contains("name an earlier checkpoint-N directory instead")
                && message.contains(expected),
            "{checkpoint}/{file}: {message}"
        );
    }
}

/// `mpirun` for this machine's loopback, or `None` (with SKIPPED printed)
/// where pt-host was built without MPI or Open MPI is missing; scripts/test.sh
/// sets PT_REQUIRE_MPI, so CI never skips.
fn mpirun() -> Option<Command> {
    let available = cfg!(feature = "mpi")
        && Command::new("mpirun")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var_os("PT_REQUIRE_MPI").is_none(),
            "PT_REQUIRE_MPI is set but pt-host was built without --features mpi or mpirun is missing"
        );
        eprintln!("SKIPPED: needs `--features mpi` and Open MPI's mpirun");
        return None;
    }
    let mut command = Command::new("mpirun");
    command
        .args(["--oversubscribe", "--mca", "btl", "self,tcp"])
        .args(["--mca", "btl_tcp_if_include", "lo"])
        // CI containers run as root.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    Some(command)
}

/// `run`'s arguments for a data-parallel comparison: LoRA with dropout and
/// gradient accumulation, evaluation, checkpoints at step 3 and 6.
fn parallel_args(dir: &Path, output: &str, batch: usize) -> Vec<String> {
    run_args(
        dir,
        output,
        &[
            "--do_train",
            "--do_eval",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "3",
            "--learning_rate",
            "1e-2",
            "--max_steps",
            "6",
            "--gradient_accumulation_steps",
            "2",
            "--lora_dropout",
            "0.1",
            "--logging_steps",
            "1",
            "--save_steps",
            "3",
            "--per_device_train_batch_size",
            &batch.to_string(),
        ],
    )
}

/// `(step, loss)` of every training log line, and the eval losses.
fn losses(output_dir: &Path) -> (Vec<(u64, f64)>, Vec<f64>) {
    let log = fs::read_to_string(output_dir.join("trainer_log.jsonl")).unwrap();
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        entries
            .iter()
            .filter_map(|e| Some((e["step"].as_u64()?, e["loss"].as_f64()?)))
            .collect(),
        entries
            .iter()
            .filter_map(|e| e["eval_loss"].as_f64())
            .collect(),
    )
}

fn assert_same_adapter(actual: &Path, expected: &Path) {
    for ((name, a), (_, e)) in adapter(actual).iter().zip(adapter(expected)) {
        let worst = a
            .iter()
            .zip(&e)
            .map(|(a, e)| (a - e).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{name}: differs by {worst}");
    }
}

#[test]
fn two_mpi_ranks_train_what_one_process_trains_with_twice_the_micro_batch() {
    let Some(mut mpirun) = mpirun() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let alone = Command::new(env!("CARGO_BIN_EXE_pt-host"))
        .args(parallel_args(dir.path(), "alone", 4))
        .output()
        .unwrap();
    assert_ok(&alone);
    let parallel = mpirun
        .args(["-n", "2", env!("CARGO_BIN_EXE_pt-host")])
        .args(parallel_args(dir.path(), "parallel", 2))
        .output()
        .unwrap();
    assert_ok(&parallel);
    let said = String::from_utf8_lossy(&parallel.stderr);
    assert!(
        said.contains("data parallel: 2 ranks (mpirun, mpi), 2 × 2 blocks per micro-batch"),
        "{said}"
    );
    // Rank 0 alone speaks and writes.
    assert_eq!(said.matches("outputs in").count(), 1, "{said}");
    assert_eq!(said.matches("saved ").count(), 2, "{said}");

    // Same adapter, same step losses, same evaluations, dropout included:
    // each rank draws the masks its rows have in the whole micro-batch.
    let (alone_dir, parallel_dir) = (dir.path().join("alone"), dir.path().join("parallel"));
    assert_same_adapter(&parallel_dir, &alone_dir);
    assert_same_adapter(
        &parallel_dir.join("checkpoint-3"),
        &alone_dir.join("checkpoint-3"),
    );
    let ((steps, evals), (expected_steps, expected_evals)) =
        (losses(&parallel_dir), losses(&alone_dir));
    assert_eq!(steps.len(), 6);
    for ((step, loss), (_, expected)) in steps.iter().zip(&expected_steps) {
        assert!(
            (loss - expected).abs() < 1e-5 * expected,
            "step {step}: {loss} vs {expected}"
        );
    }
    assert_eq!(evals.len(), 2);
    for (loss, expected) in evals.iter().zip(&expected_evals) {
        assert!(
            (loss - expected).abs() < 1e-6 * expected,
            "eval {loss} vs {expected}"
        );
    }
    // One process that asks for the backend runs the same sums over one
    // rank (how one GPU proves the NCCL path).
    let mut args = parallel_args(dir.path(), "one-rank", 4);
    args.extend(["--ddp_backend".to_string(), "mpi".to_string()]);
    let one_rank = Command::new(env!("CARGO_BIN_EXE_pt-host"))
        .args(args)
        .output()
        .unwrap();
    assert_ok(&one_rank);
    assert!(
        String::from_utf8_lossy(&one_rank.stderr)
            .contains("data parallel: 1 rank (a single process, mpi)"),
        "{}",
        String::from_utf8_lossy(&one_rank.stderr)
    );
    assert_same_adapter(&dir.path().join("one-rank"), &alone_dir);
    let summary = json(&dir.path().join("one-rank/train_results.json"));
    assert!(
        summary["train_allreduce_seconds"].as_f64().unwrap() > 0.0,
        "{summary}"
    );

    let state = json(&parallel_dir.join("checkpoint-3/trainer_state.json"));
    assert_eq!(
        (
            state["stateful_callbacks"]["PtHost"]["attributes"]["world_size"].as_u64(),
            state["train_batch_size"].as_u64()
        ),
        (Some(2), Some(2))
    );

    // One process resumes the 2-rank checkpoint with the same blocks per
    // micro-batch (1 × 4) and ends where the uninterrupted runs ended...
    let resume = |batch: usize| {
        let mut args = parallel_args(dir.path(), "parallel", batch);
        args.extend([
            "--resume_from_checkpoint".to_string(),
            parallel_dir.join("checkpoint-3").display().to_string(),
        ]);
        Command::new(env!("CARGO_BIN_EXE_pt-host"))
            .args(args)
            .output()
            .unwrap()
    };
    assert_ok(&resume(4));
    assert_same_adapter(&parallel_dir, &alone_dir);
    // ...and is refused with 1 × 2, which would not continue the data order.
    let refused = resume(2);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("trained by 2 rank(s) × 2 blocks per micro-batch, this run has 1 × 2")
            && said.contains("ranks × --per_device_train_batch_size = 4"),
        "{said}"
    );
}

#[test]
fn ranks_that_disagree_or_fail_end_the_job() {
    let (Some(mut mpirun), Some(mut mpirun_again)) = (mpirun(), mpirun()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut other = parallel_args(dir.path(), "other", 2);
    let at = other.iter().position(|a| a == "--block_size").unwrap();
    other[at + 1] = "16".into();
    // MPMD: rank 1 cuts other blocks, as a node with other flags or files would.
    let output = mpirun
        .args(["-n", "1", env!("CARGO_BIN_EXE_pt-host")])
        .args(parallel_args(dir.path(), "other", 2))
        .args([":", "-n", "1", env!("CARGO_BIN_EXE_pt-host")])
        .args(other)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("ranks disagree on the number of training blocks (rank 0: 262, rank 1: 525)"),
        "{said}"
    );

    // A rank that fails before it joins ends the job too, promptly.
    let mut broken = parallel_args(dir.path(), "broken", 2);
    broken.extend(["--lora_rank".to_string(), "0".to_string()]);
    let started = std::time::Instant::now();
    let output = mpirun_again
        .args(["-n", "1", env!("CARGO_BIN_EXE_pt-host")])
        .args(parallel_args(dir.path(), "broken", 2))
        .args([":", "-n", "1", env!("CARGO_BIN_EXE_pt-host")])
        .args(broken)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--lora_rank must be at least 1"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
}

#[test]
fn launcher_variables_without_a_usable_backend_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let launched = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_pt-host"))
            .args(run_args(
                dir.path(),
                "out",
                &[&["--do_train"], extra].concat(),
            ))
            .env("RANK", "0")
            .env("WORLD_SIZE", "2")
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    // torchrun-style variables on a CPU default to MPI, which did not start these ranks.
    let said = launched(&[]);
    if cfg!(feature = "mpi") {
        assert!(
            said.contains("torchrun says rank 0 of 2, but MPI sees rank 0 of 1")
                && said.contains("--ddp_backend nccl"),
            "{said}"
        );
    } else {
        assert!(
            said.contains("built without MPI") && said.contains("--features mpi"),
            "{said}"
        );
    }
    if !cfg!(feature = "nccl") {
        let said = launched(&["--ddp_backend", "nccl"]);
        assert!(
            said.contains("built without NCCL") && said.contains("--features cuda,nccl"),
            "{said}"
        );
    }
}

/// A metric plugin cannot overwrite what pt-host reports: a host-owned name
/// (`loss` would become `eval_loss`), a name with terminal escapes, or more
/// values than the bound end the evaluation with the plugin's name.
#[test]
fn metric_plugins_cannot_overwrite_or_flood_the_results() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = common::component("hostile");
    for (mode, expected) in [
        (
            "metric_reserved",
            "metric plugin `hostile` returned metric `loss`, which is pt-host's own",
        ),
        ("metric_escape", "returned a metric named `score\\u{1b}[2J`"),
        (
            "metric_flood",
            "metric plugin `hostile` returned 100000 values; the limit is 32",
        ),
    ] {
        let config = format!(r#"hostile={{"mode":"{mode}","marker":""}}"#);
        let output = run(
            dir.path(),
            mode,
            &[
                "--do_eval",
                "--plugin",
                plugin.to_str().unwrap(),
                "--plugin_config",
                &config,
            ],
        );
        assert_eq!(output.status.code(), Some(1), "{mode}");
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains(expected), "{mode}: {message}");
        assert!(
            !message.contains('\u{1b}'),
            "{mode}: raw escape in {message}"
        );
        assert!(!dir.path().join(mode).join("eval_results.json").exists());
    }
}

/// Values HF refuses are refused before any data work, naming the flag;
/// MedicalGPT's `--group_by_length False` and HF's `--bf16` keep their meaning.
#[test]
fn hf_flag_values_are_checked_and_mean_what_they_mean_in_hf() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, expected) in [
        (
            &["--warmup_ratio", "1.5"][..],
            "--warmup_ratio must be in [0, 1]",
        ),
        (
            &["--lora_alpha", "nan"][..],
            "--lora_alpha must be a finite number",
        ),
        (
            &["--target_modules", "query_key_value,q_proj"][..],
            "`q_proj` is not a linear layer of a bloom model",
        ),
        (
            &["--bf16", "--fp16"][..],
            "--bf16 and --fp16 exclude each other",
        ),
        (
            &["--frozen_weights", "bf16", "--use_peft", "false"][..],
            "--frozen_weights bf16 holds a frozen base in bf16 for LoRA on top: it needs --use_peft true",
        ),
        (
            &["--frozen_weights", "bf16", "--qlora"][..],
            "--frozen_weights bf16 and --load_in_4bit (or --qlora, --quantization_bit) each say how the base is held: choose one",
        ),
    ] {
        let output = run(dir.path(), "refused", &[&["--do_train"], flags].concat());
        assert_eq!(output.status.code(), Some(1), "{flags:?}");
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains(expected), "{flags:?}: {message}");
        assert!(
            !dir.path().join("cache/datasets").exists(),
            "{flags:?}: data work started"
        );
    }
    let output = run(
        dir.path(),
        "padded",
        &["--do_eval", "--group_by_length", "False", "--bf16", "True"],
    );
    assert_ok(&output);
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("--group_by_length false: one padded block per document"),
        "{message}"
    );
    let report = json(&dir.path().join("padded/data_report.json"));
    assert_eq!(report["packing"], false);
    // One block per validation document (40 lines), not the 20 packed ones.
    assert_eq!(report["validation"]["blocks"], 40);
}

/// What transformers reads: `trainer_state.json` of a checkpoint and of the
/// output directory loads with `TrainerState.load_from_json`, and the
/// `*_results.json` files carry HF's keys.
#[test]
fn trainer_state_and_results_are_what_hf_reads() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(
        dir.path(),
        "out",
        &words("--do_train --do_eval --max_steps 4 --save_steps 2 --logging_steps 1"),
    );
    assert_ok(&output);
    let out = dir.path().join("out");
    let results = json(&out.join("train_results.json"));
    for key in [
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "total_flos",
        "train_loss",
        "epoch",
    ] {
        assert!(
            results[key].is_number(),
            "train_results.json has no {key}: {results}"
        );
        assert!(
            json(&out.join("all_results.json"))[key].is_number(),
            "all_results.json: {key}"
        );
    }
    // 4 steps × 8 blocks × 32 tokens, × 6 × the non-embedding parameters.
    let state = json(&out.join("trainer_state.json"));
    assert_eq!(state["num_input_tokens_seen"], 4 * 8 * 32);
    assert!(state["total_flos"].as_f64().unwrap() > 0.0);
    assert_eq!(
        state["stateful_callbacks"]["PtHost"]["attributes"]["world_size"],
        1
    );
    if !common::python_has("trainer_state_and_results_are_what_hf_reads") {
        return;
    }
    for path in [
        out.join("trainer_state.json"),
        out.join("checkpoint-2/trainer_state.json"),
    ] {
        let loaded = Command::new("python3")
            .args([
                "-c",
                "import sys; from transformers.trainer_callback import TrainerState; \
                 s = TrainerState.load_from_json(sys.argv[1]); print(s.global_step, len(s.log_history))",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert_ok(&loaded);
        let said = String::from_utf8_lossy(&loaded.stdout);
        let step = if path.ends_with("checkpoint-2/trainer_state.json") {
            "2"
        } else {
            "4"
        };
        assert!(
            said.starts_with(&format!("{step} ")),
            "{}: {said}",
            path.display()
        );
    }
}

/// Two sources mixed 0.8/0.2: the draw follows the weights, each source's
/// validation loss is reported and equals an evaluation of that source
/// alone, and the mix is the same in every run (a resumed run ends where an
/// uninterrupted one ends).
#[test]
fn mixed_sources_follow_their_weights_and_report_each_validation_loss() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = common::repo().join("data/pretrain");
    let (domain, general) = (corpus.join("fever.txt"), corpus.join("tianlongbabu.txt"));
    let model = fixture_model();
    let run = |output: &str, sources: &[&Path], extra: &[&str]| {
        PtHost::new(["run", "--model_name_or_path", common::arg(&model)])
            .args(["--output_dir", common::arg(&dir.path().join(output))])
            .args(["--cache_dir", common::arg(&dir.path().join("cache"))])
            .args(words(
                "--block_size 32 --validation_split_percentage 5 --disable_tqdm",
            ))
            .arg("--train_file_dir")
            .args(sources.iter().map(|s| common::arg(s)))
            .args(extra)
            .succeeds()
    };
    let results = |output: &str| json(&dir.path().join(output).join("eval_results.json"));
    let weights = ["--mix_weights", "0.8,0.2"];
    for (bad, expected) in [
        (
            "0.5,0.3,0.2",
            "--mix_weights has 3 weights for 2 --train_file_dir sources",
        ),
        ("0.8,-0.2", "--mix_weights must be positive numbers"),
    ] {
        PtHost::new([
            "run",
            "--do_eval",
            "--model_name_or_path",
            common::arg(&model),
        ])
        .args(["--output_dir", common::arg(&dir.path().join("bad"))])
        .args([
            "--train_file_dir",
            common::arg(&domain),
            common::arg(&general),
        ])
        .args(["--mix_weights", bad])
        .fails_with(expected);
    }

    run(
        "mixed",
        &[&domain, &general],
        &[&weights[..], &["--do_eval"]].concat(),
    );
    let mixed = results("mixed");
    for (name, source) in [("fever", &domain), ("tianlongbabu", &general)] {
        run(name, &[source], &["--do_eval"]);
        let alone = results(name)["eval_loss"].as_f64().unwrap();
        let ours = mixed[format!("eval_{name}_loss")].as_f64().unwrap();
        assert!(
            ((ours - alone) / alone).abs() < 1e-5,
            "{name}: {ours} mixed, {alone} alone"
        );
    }
    let (fever, novel) = (
        mixed["eval_fever_loss"].as_f64().unwrap(),
        mixed["eval_tianlongbabu_loss"].as_f64().unwrap(),
    );
    let all = mixed["eval_loss"].as_f64().unwrap();
    assert!(fever.min(novel) < all && all < fever.max(novel), "{all}");

    // interleave_under: the source that runs out first is drawn whole, the
    // other at its share, within sampling error.
    let report = json(&dir.path().join("mixed/data_report.json"));
    let mix = &report["mix"];
    assert_eq!(mix["strategy"], "interleave_under");
    let sources = mix["sources"].as_array().unwrap();
    let total = report["train"]["blocks"].as_f64().unwrap();
    let drawn = |s: &serde_json::Value| s["blocks_drawn"].as_f64().unwrap();
    assert_eq!(drawn(&sources[0]) + drawn(&sources[1]), total);
    assert!(
        sources
            .iter()
            .any(|s| drawn(s) == s["blocks_available"].as_f64().unwrap()),
        "{mix}"
    );
    for (source, weight) in sources.iter().zip([0.8, 0.2]) {
        let sigma = (weight * (1.0 - weight) / total).sqrt();
        let share = drawn(source) / total;
        assert!((share - weight).abs() < 4.0 * sigma, "{share} for {weight}");
        assert!(source["report"]["train"]["blocks"].as_u64().unwrap() > 0);
    }
    let excluded = fs::read_to_string(dir.path().join("mixed/excluded.jsonl")).unwrap();
    assert_eq!(
        excluded.lines().count(),
        0,
        "no plugin, no duplicates: nothing excluded"
    );

    // Training on the mix, interrupted and resumed, ends where it ends
    // uninterrupted; evaluation logs each source's loss.
    let train = words(
        "--do_train --do_eval --max_steps 6 --save_steps 3 --per_device_train_batch_size 4 \
         --learning_rate 5e-3 --seed 3 --logging_steps 3 --eval_strategy steps",
    );
    let train = [&weights[..], &train].concat();
    run("straight", &[&domain, &general], &train);
    run("resumed", &[&domain, &general], &train);
    let resumed = dir.path().join("resumed");
    fs::remove_dir_all(resumed.join("checkpoint-6")).unwrap();
    fs::remove_file(resumed.join("adapter_model.safetensors")).unwrap();
    let resume = [&train[..], &["--resume_from_checkpoint", "true"]].concat();
    run("resumed", &[&domain, &general], &resume);
    assert_eq!(adapter(&dir.path().join("straight")), adapter(&resumed));
    let log = fs::read_to_string(dir.path().join("straight/trainer_log.jsonl")).unwrap();
    let evaluations = log
        .lines()
        .filter(|l| l.contains("eval_fever_loss"))
        .count();
    assert_eq!(evaluations, 2, "{log}");
    assert!(results("straight")["eval_tianlongbabu_loss"].is_number());
}

/// The reference models of tests/fixtures/mc-tasks/expected.json: the name
/// its numbers are recorded under, the fixture model, and its tokenizer when
/// not the model's (llama-tiny's with a BOS before every encoding). Qwen2
/// (QKV biases), Qwen3 (QK norms) and Mistral (a 16-token sliding window,
/// shorter than the prompts) come after.
const REFERENCE_MODELS: [(&str, &str, Option<&str>); 6] = [
    ("bloom-tiny", "bloom-tiny", None),
    ("llama-tiny", "llama-tiny", None),
    (
        "llama-bos-tokenizer",
        "llama-tiny",
        Some("mc-tasks/llama-bos-tokenizer"),
    ),
    ("qwen2-tiny", "qwen2-tiny", None),
    ("qwen3-tiny", "qwen3-tiny", None),
    ("mistral-tiny", "mistral-tiny", None),
];

/// Runs `eval` on a reference model with `flags` and checks each of `tasks`
/// against transformers' numbers (tests/python/mc_reference.py, recorded in
/// tests/fixtures/mc-tasks/expected.json): every choice's log-likelihood
/// within 1e-4, the same predictions and accuracy. Returns the
/// log-likelihoods compared.
fn assert_scored_as_reference(
    (family, model, tokenizer): (&str, &str, Option<&str>),
    shots: &str,
    tasks: &[&str],
    flags: &[&str],
) -> usize {
    let fixtures = common::repo().join("tests/fixtures");
    let expected = json(&fixtures.join("mc-tasks/expected.json"));
    let model = fixtures.join(model).join("model");
    let tokenizer = tokenizer.map(|dir| fixtures.join(dir).display().to_string());
    let tokenizer_flags: Vec<&str> = match &tokenizer {
        Some(dir) => vec!["--tokenizer_name_or_path", dir],
        None => Vec::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let common_flags = [
        "--do_eval",
        "--eval_num_fewshot",
        shots,
        "--eval_max_length",
        "96",
        "--per_device_eval_batch_size",
        "3",
    ];
    let output = Command::new(env!("CARGO_BIN_EXE_pt-host"))
        .args(run_args_of(
            &model,
            dir.path(),
            "eval",
            &[&common_flags[..], flags, &tokenizer_flags].concat(),
        ))
        .output()
        .unwrap();
    assert_ok(&output);
    let results = json(&dir.path().join("eval/eval_results.json"));
    let mut compared = 0;
    for task in tasks {
        let reference = expected["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["model"] == family
                    && r["task"] == *task
                    && r["num_fewshot"] == shots.parse::<u64>().unwrap()
            })
            .unwrap();
        let ours: Vec<serde_json::Value> =
            fs::read_to_string(dir.path().join(format!("eval/eval_tasks/{task}.jsonl")))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        let theirs = reference["questions"].as_array().unwrap();
        assert_eq!(ours.len(), theirs.len(), "{family} {task} {shots}-shot");
        let mut right = 0;
        for (mine, hers) in ours.iter().zip(theirs) {
            let source = hers["source"].as_str().unwrap();
            assert!(
                mine["source"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("/{source}")),
                "{mine} vs {hers}"
            );
            for (a, b) in mine["scores"]
                .as_array()
                .unwrap()
                .iter()
                .zip(hers["scores"].as_array().unwrap())
            {
                let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                assert!((a - b).abs() < 1e-4, "{family} {task} {source}: {a} vs {b}");
                compared += 1;
            }
            assert_eq!(mine["prediction"], hers["prediction"], "{source}");
            assert_eq!(mine["answer"], hers["answer"], "{source}");
            right += usize::from(hers["prediction"] == hers["answer"]);
        }
        let acc = results[format!("eval_{task}_acc")].as_f64().unwrap();
        assert_eq!(acc, right as f64 / theirs.len() as f64, "{task}");
        assert!(results[format!("eval_{task}_acc_macro")].is_f64());
    }
    compared
}

/// `--eval_tasks` scores every choice of a hand-written MMLU-style (English)
/// and C-Eval-style (Chinese, unpublished test answers) task as
/// lm-evaluation-harness does, zero- and two-shot, with prompts cut from the
/// left to the 96-token window, on BLOOM, Llama (also with a BOS-adding
/// tokenizer), Qwen2, Qwen3 and Mistral.
#[test]
fn benchmark_tasks_score_as_lm_evaluation_harness_does() {
    let tasks = common::repo().join("tests/fixtures/mc-tasks");
    let task_list = format!(
        "{},{}",
        tasks.join("en").display(),
        tasks.join("zh").display()
    );
    let mut compared = 0;
    for reference in &REFERENCE_MODELS[..2] {
        for shots in ["0", "2"] {
            compared += assert_scored_as_reference(
                *reference,
                shots,
                &["en", "zh"],
                &["--eval_tasks", &task_list],
            );
        }
    }
    // A tokenizer that puts a BOS before the context and before the context
    // with its continuation (the continuation is still what follows), and
    // the other families.
    let en = tasks.join("en").display().to_string();
    for reference in &REFERENCE_MODELS[2..] {
        for shots in ["0", "2"] {
            compared +=
                assert_scored_as_reference(*reference, shots, &["en"], &["--eval_tasks", &en]);
        }
    }
    assert_eq!(compared, (2 * 2 * (5 + 5) + 4 * 2 * 5) * 4);
}

/// A task plugin (interface 0.2.0; medqa_tasks) reads MedQA's JSONL, a
/// layout the host does not know, in two formats: the harness's
/// medqa_4options prompt on the letters, and the options' own words
/// (continuations of several tokens). Both score as transformers does.
#[test]
fn plugin_tasks_score_as_lm_evaluation_harness_does() {
    let file = common::repo().join("tests/fixtures/mc-tasks/medqa.jsonl");
    let plugin = common::component("medqa_tasks");
    let task_list = format!("medqa={0},medqa_text={0}", file.display());
    let mut compared = 0;
    for reference in REFERENCE_MODELS {
        compared += assert_scored_as_reference(
            reference,
            "0",
            &["medqa", "medqa_text"],
            &[
                "--plugin",
                plugin.to_str().unwrap(),
                "--eval_tasks",
                &task_list,
            ],
        );
    }
    assert_eq!(compared, 6 * 2 * 6 * 4);
}

/// `run --eval_tasks` scores the tasks at every evaluation: the curve is in
/// `trainer_log.jsonl` and TensorBoard beside the loss.
#[test]
fn benchmark_accuracy_is_logged_at_every_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = common::repo().join("tests/fixtures/mc-tasks/en");
    let output = run(
        dir.path(),
        "out",
        &[
            "--do_train",
            "--do_eval",
            "--max_steps",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--eval_tasks",
            tasks.to_str().unwrap(),
            "--report_to",
            "tensorboard",
            "--logging_dir",
            dir.path().join("tb").to_str().unwrap(),
        ],
    );
    assert_ok(&output);
    if let Some(scalars) = tensorboard_scalars(&dir.path().join("tb")) {
        // The accuracy curve, as TensorBoard's own reader sees it: steps 1
        // and 2, and the final evaluation's at step 2.
        let curve = scalars["eval/en_acc"].as_array().unwrap();
        let steps: Vec<i64> = curve.iter().map(|p| p[0].as_i64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 2], "{curve:?}");
        assert!(scalars["eval/en_acc_macro"].is_array());
    }
    let log = fs::read_to_string(dir.path().join("out/trainer_log.jsonl")).unwrap();
    let scored: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|entry| entry.get("eval_en_acc").is_some())
        .collect();
    assert_eq!(scored.len(), 2, "{log}");
    assert!(
        scored
            .iter()
            .all(|e| e["eval_loss"].is_f64() && e["eval_en_acc_macro"].is_f64())
    );
    // And the final evaluation's.
    let results = json(&dir.path().join("out/eval_results.json"));
    assert!(results["eval_en_acc"].is_f64(), "{results}");
}

/// `eval --base_model_name_or_path` evaluates the base and the trained model
/// (base + the fixture's PEFT-trained adapter) on the same corpora and tasks
/// and reports the differences: the base's answers are HF's (the
/// mc-tasks reference), each perplexity is what a plain evaluation of that
/// model gives, and the paired standard errors are recomputed here from the
/// two models' answers.
#[test]
fn base_vs_trained_report_compares_the_same_questions() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = common::repo().join("tests/fixtures/mc-tasks");
    let task_list = format!(
        "{},{}",
        tasks.join("en").display(),
        tasks.join("zh").display()
    );
    let adapter = fixture().join("lora_final");
    let general = fixture().join("train.txt");
    let common_flags = [
        "--eval_tasks",
        &task_list,
        "--eval_max_length",
        "96",
        "--per_device_eval_batch_size",
        "3",
    ];
    let mut args = run_args(dir.path(), "report", &common_flags);
    args[0] = "eval".into();
    args.extend(
        [
            "--peft_path",
            adapter.to_str().unwrap(),
            "--base_model_name_or_path",
            fixture_model().to_str().unwrap(),
            "--general_file_dir",
            general.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let output = Command::new(env!("CARGO_BIN_EXE_pt-host"))
        .args(&args)
        .output()
        .unwrap();
    assert_ok(&output);
    let report_dir = dir.path().join("report");
    let report = json(&report_dir.join("eval_report.json"));

    // Each side's perplexity is a plain evaluation's of that model.
    for (side, extra) in [
        ("base", vec!["--use_peft", "false"]),
        ("trained", vec!["--peft_path", adapter.to_str().unwrap()]),
    ] {
        let batches = ["--do_eval", "--per_device_eval_batch_size", "3"];
        let plain = run(dir.path(), side, &[&batches[..], &extra].concat());
        assert_ok(&plain);
        let expected = json(&dir.path().join(side).join("eval_results.json"))["perplexity"]
            .as_f64()
            .unwrap();
        let got = report["domain_perplexity"][side].as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-9 * expected,
            "{side}: {got} vs {expected}"
        );
        assert!(
            report["general_perplexity"][side]
                .as_f64()
                .unwrap()
                .is_finite()
        );
    }
    assert_ne!(
        report["domain_perplexity"]["base"], report["domain_perplexity"]["trained"],
        "the adapter changes the model"
    );

    let reference = json(&tasks.join("expected.json"));
    for task in ["en", "zh"] {
        let answers = |side: &str| -> Vec<serde_json::Value> {
            fs::read_to_string(report_dir.join(format!("{side}/eval_tasks/{task}.jsonl")))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (base, trained) = (answers("base"), answers("trained"));
        let hf = reference["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"] == "bloom-tiny" && r["task"] == task && r["num_fewshot"] == 0)
            .unwrap()["questions"]
            .as_array()
            .unwrap();
        let hf_predictions: Vec<_> = hf.iter().map(|q| &q["prediction"]).collect();
        let base_predictions: Vec<_> = base.iter().map(|q| &q["prediction"]).collect();
        assert_eq!(base_predictions, hf_predictions, "{task}");

        let right = |q: &serde_json::Value| f64::from(u8::from(q["prediction"] == q["answer"]));
        let n = base.len() as f64;
        let differences: Vec<f64> = base
            .iter()
            .zip(&trained)
            .map(|(b, t)| right(t) - right(b))
            .collect();
        let mean = differences.iter().sum::<f64>() / n;
        let variance = differences.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let compared = report["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task"] == task)
            .unwrap();
        let overall = &compared["overall"];
        let base_acc = hf.iter().map(right).sum::<f64>() / n;
        assert!((overall["base_acc"].as_f64().unwrap() - base_acc).abs() < 1e-12);
        assert!((overall["difference"].as_f64().unwrap() - mean).abs() < 1e-12);
        let stderr = (variance / n).sqrt();
        assert!((overall["difference_stderr"].as_f64().unwrap() - stderr).abs() < 1e-12);
        assert_eq!(overall["questions"], base.len());
        assert!(!compared["subjects"].as_array().unwrap().is_empty());
        let png = fs::read(report_dir.join(format!("eval_report_{task}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
    let table = fs::read_to_string(report_dir.join("eval_report.md")).unwrap();
    assert!(table.contains("| domain perplexity ("), "{table}");
    assert!(table.contains("| general perplexity ("), "{table}");
    assert!(table.contains("| en acc ("), "{table}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("| zh acc_macro ("));
}

/// A task plugin that misbehaves (the hostile guest) stops the run with an
/// error naming the plugin and the record, never a hang or a wrong score;
/// so do task entries no plugin reads, missing or non-UTF-8 task files and
/// two tasks of one name.
#[test]
fn task_plugin_failures_name_the_plugin_and_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = common::component("hostile");
    let records = dir.path().join("records.txt");
    fs::write(
        &records,
        "a fair question\n\nthe question with MARK in it\n",
    )
    .unwrap();
    let bad_utf8 = dir.path().join("bad.txt");
    fs::write(&bad_utf8, b"fine\n\xff\xfe\n").unwrap();
    let line = |n: usize| format!("{}:{n}", records.display());
    let args = |mode: &str, config: &str, task: &str| -> Vec<String> {
        let flags = [
            "--do_eval",
            "--plugin",
            hostile.to_str().unwrap(),
            "--plugin_config",
            config,
            "--plugin_timeout_ms",
            "500",
            "--eval_tasks",
            task,
        ];
        run_args(dir.path(), mode, &flags)
    };
    let task = format!("hostile={}", records.display());
    // A trap: the plugin's own panic message (which PtHost::fails_with
    // would take for pt-host's) comes with it.
    let config = r#"hostile={"mode":"task_trap","marker":"MARK"}"#;
    let trapped = Command::new(env!("CARGO_BIN_EXE_pt-host"))
        .args(args("task_trap", config, &task))
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&trapped.stderr);
    assert_eq!(trapped.status.code(), Some(1), "{message}");
    assert!(
        message.contains(&format!(
            "task plugin `hostile` failed on {} to {}: trapped",
            line(1),
            line(3)
        )) && message.contains("hostile task reader panicked on purpose"),
        "{message}"
    );
    let cases = [
        (
            "task_loop",
            "did not finish within the 500 ms deadline".to_string(),
        ),
        (
            "task_refuse",
            format!(
                "{}: task plugin `hostile` cannot read this record: this record is refused on purpose",
                line(3)
            ),
        ),
        (
            "task_gold",
            format!(
                "{}: task plugin `hostile` gave an item with gold 4 of 4 continuations",
                line(3)
            ),
        ),
        (
            "task_one_choice",
            format!(
                "{}: task plugin `hostile` gave an item with 1 continuations (an item has 2 to 64)",
                line(3)
            ),
        ),
        (
            "task_flood",
            format!(
                "{}: task plugin `hostile` gave 5000 items for one record; the limit is 1024",
                line(3)
            ),
        ),
        (
            "task_miscount",
            format!(
                "task plugin `hostile` returned 1 results for 2 records ({} to {}): one per record is the contract",
                line(1),
                line(3)
            ),
        ),
    ];
    for (mode, expected) in cases {
        let config = format!(r#"hostile={{"mode":"{mode}","marker":"MARK"}}"#);
        PtHost::new(args(mode, &config, &task)).fails_with(&expected);
    }
    let medqa = common::repo().join("tests/fixtures/mc-tasks/medqa.jsonl");
    for (tasks, expected) in [
        (
            format!("medqa={}", medqa.display()),
            format!(
                "--eval_tasks medqa={}: no --plugin reads task format `medqa` (the loaded plugins read: hostile (hostile))",
                medqa.display()
            ),
        ),
        (
            "hostile=no/such.jsonl".to_string(),
            "--eval_tasks: no/such.jsonl: no such task file or directory".to_string(),
        ),
        (
            format!("hostile={}", bad_utf8.display()),
            format!("{}:2: not UTF-8", bad_utf8.display()),
        ),
        (
            format!("hostile={0},hostile={0}", records.display()),
            "--eval_tasks: two tasks are named `hostile`".to_string(),
        ),
    ] {
        let config = r#"hostile={"mode":"task_fair","marker":"MARK"}"#;
        PtHost::new(args("tasks", config, &tasks)).fails_with(&expected);
    }
}

/// `eval --eval_tasks` without a corpus scores the benchmarks alone (HF's
/// accuracy on the mc-tasks reference), and the base-vs-trained report
/// then compares accuracies only.
#[test]
fn benchmarks_alone_need_no_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let en = common::repo().join("tests/fixtures/mc-tasks/en");
    let cache = dir.path().join("cache");
    let eval = |output: &str, extra: &[&str]| {
        let out = dir.path().join(output);
        let mut args = vec![
            "eval",
            "--model_name_or_path",
            fixture_model().to_str().unwrap(),
            "--eval_tasks",
            en.to_str().unwrap(),
            "--eval_max_length",
            "96",
            "--cache_dir",
            cache.to_str().unwrap(),
            "--disable_tqdm",
            "--output_dir",
            out.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        let output = Command::new(env!("CARGO_BIN_EXE_pt-host"))
            .args(&args)
            .output()
            .unwrap();
        assert_ok(&output);
        out
    };
    let reference = json(&common::repo().join("tests/fixtures/mc-tasks/expected.json"));
    let hf = reference["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == "bloom-tiny" && r["task"] == "en" && r["num_fewshot"] == 0)
        .unwrap()["questions"]
        .as_array()
        .unwrap();
    let right = hf.iter().filter(|q| q["prediction"] == q["answer"]).count();
    let acc = right as f64 / hf.len() as f64;

    let alone = json(&eval("alone", &[]).join("eval_results.json"));
    assert_eq!(alone["eval_en_acc"].as_f64(), Some(acc), "{alone}");
    assert!(alone.get("eval_loss").is_none(), "{alone}");

    let adapter = fixture().join("lora_final");
    let base = fixture_model().display().to_string();
    let report_dir = eval(
        "report",
        &[
            "--peft_path",
            adapter.to_str().unwrap(),
            "--base_model_name_or_path",
            &base,
        ],
    );
    let report = json(&report_dir.join("eval_report.json"));
    assert!(report.get("domain_perplexity").is_none(), "{report}");
    assert_eq!(
        report["tasks"][0]["overall"]["base_acc"].as_f64(),
        Some(acc)
    );
}
