//! The front end of `difinfo-train`: one module per subcommand (its clap options, its checks,
//! its progress bars and what it prints), [`shared`] for what several share (model and
//! tokenization options, model-and-prompts loading, output checks, progress bars), and
//! [`training`] for the training commands' resolution of options and their run. The library
//! layers below ([`crate::train`], [`crate::diag`], ...) know nothing of clap or of this module.

pub mod bench;
pub mod bench_forward;
pub mod bench_generate;
pub mod beta_accuracy;
pub mod build_pairs;
pub mod convert;
pub mod did_entropy;
pub mod dpo;
pub mod entropy;
pub mod init;
pub mod logps;
pub mod merge;
pub mod plan;
pub mod plot;
pub mod report;
pub mod resample_rejected;
pub mod reward;
pub mod sample;
pub mod score;
pub mod sft;
pub mod shared;
pub mod training;

use clap::{ArgMatches, Subcommand};

use crate::Result;

/// The subcommands.
#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; `dpo` carries TRL's DPOConfig loss fields
pub enum Command {
    /// Create a random-weight checkpoint (Llama by default) with a BPE tokenizer trained on a corpus.
    Init(init::InitArgs),
    /// Convert a GGUF file (llama.cpp, Ollama; Llama-family or Qwen2, any quantization candle
    /// dequantizes) into a Hugging Face checkpoint directory: config.json, model.safetensors,
    /// tokenizer.json and tokenizer_config.json rebuilt from its metadata, generation_config.json.
    Convert(convert::ConvertArgs),
    /// Write chosen/rejected completion log-probs of a preference dataset as JSONL.
    Logps(logps::LogpsArgs),
    /// Sample completions of prompts, with their summed log-probs under the model.
    Sample(sample::SampleArgs),
    /// One reward per prompt/completion under a reward model (a `…ForSequenceClassification`
    /// checkpoint with one label): `sample`'s rows or a preference file's both sides, with the
    /// mean and a 95 % interval per label and per prompt.
    Score(score::ScoreArgs),
    /// Measure forward (and forward+backward) throughput in tokens/s.
    BenchForward(bench_forward::BenchForwardArgs),
    /// New tokens/s and peak memory of sampling (`sample`'s generation, a KV cache), as a table.
    BenchGenerate(bench_generate::BenchGenerateArgs),
    /// Supervised fine-tuning (TRL SFTTrainer options): NLL of completions or of whole sequences.
    Sft(sft::SftArgs),
    /// Preference optimization (TRL DPOTrainer options): every TRL loss type and combination,
    /// reference-free, a separate reference model, DPO-PG.
    Dpo(dpo::DpoArgs),
    /// Train a reward model on preference pairs (TRL RewardTrainer options): Bradley–Terry loss
    /// with an optional margin column and center_rewards_coefficient; the checkpoint loads in
    /// transformers as a sequence classifier with one label.
    Reward(reward::RewardArgs),
    /// Draw a run's metrics.jsonl (loss, rewards, log-probs, grad norm, learning rate) into a PNG.
    Plot(plot::PlotArgs),
    /// Tokens/s and peak memory of full training steps (DPO, DPO-PG), as a table.
    Bench(bench::BenchArgs),
    /// Memory per device (weights, gradients, optimizer state under ZeRO 0/1, activations) and
    /// FLOPs per optimizer step of a DPO run, from a config.json; whether it fits a device.
    Plan(plan::PlanArgs),
    /// Monte Carlo sequence entropy per prompt (Appendix K): pure ancestral sampling over the
    /// whole vocabulary, stopping at EOS or after --max-new-tokens; with standard errors and the
    /// mean exact next-token entropy.
    Entropy(entropy::EntropyArgs),
    /// Appendix K end to end: pairs y_w ~ π, y_l ~ π_ref; a fresh π̂ (from π_ref) trained on
    /// them with the reference-free reward log π̂; the entropies H(π̂) (the DID entropy
    /// estimate), H(π_ref), H(π) and π̂'s β-accuracy. Artifacts stay in --output-dir.
    DidEntropy(did_entropy::DidEntropyCommand),
    /// Appendix K.1: per prompt, samples from the DID estimator π̂, the OLS fit of
    /// log π̂(y) = β log(π(y)/π_ref(y)) + c, and the fraction of prompts with β ≥ 0.
    BetaAccuracy(beta_accuracy::BetaAccuracyArgs),
    /// One-page log-likelihood displacement report of a finished preference run: report.md and
    /// report.png in RUN_DIR (from metrics.jsonl, and entropy.json if present).
    Report(report::ReportArgs),
    /// Fold a PEFT LoRA adapter (a `--use-peft` run's checkpoint, or any PEFT LoRA adapter of
    /// a Llama/Mistral/Qwen2 model) into its base model: a full Hugging Face checkpoint, as
    /// PEFT's merge_and_unload + save_pretrained.
    Merge(merge::MergeArgs),
    /// Pick each prompt's rejected response from candidates drawn from π_ref by
    /// sampling-importance-resampling toward Eq. 1's π_l ∝ π_ref^{1+β} π*^{−β}, with weights
    /// (π_ref(y)/π*(y))^β; writes TRL preference lines (prompt, chosen, rejected, ess).
    ResampleRejected(resample_rejected::ResampleRejectedArgs),
    /// Appendix J.2: from scored samples, each prompt's highest-reward completion as `chosen`
    /// and its lowest as `rejected`, in TRL's preference format (JSONL or Parquet).
    BuildPairs(build_pairs::BuildPairsArgs),
}

/// Runs a parsed subcommand; `sub` is its matches (the training commands tell the options given
/// on the command line from the defaults by them). Each GGUF file named by an argument is
/// converted into its cache directory first (`shared::convert_gguf_arguments`), except by
/// `convert` itself.
///
/// # Errors
/// The command's error, with its file / line / field context.
pub fn run(command: Command, sub: &ArgMatches) -> Result<()> {
    let world = crate::dist::world();
    if world.world_size() > 1
        && !matches!(
            command,
            Command::Sft(_) | Command::Dpo(_) | Command::Reward(_) | Command::Bench(_)
        )
    {
        return Err(crate::Error::Options(format!(
            "started on {} ranks: only `sft`, `dpo`, `reward` and `bench` run on more than one process",
            world.world_size()
        )));
    }
    if !matches!(command, Command::Convert(_)) {
        shared::convert_gguf_arguments(sub)?;
    }
    match command {
        Command::Init(a) => init::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Logps(a) => logps::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Score(a) => score::run(a),
        Command::BenchForward(a) => bench_forward::run(a),
        Command::BenchGenerate(a) => bench_generate::run(&a).map(|_| ()),
        Command::Sft(a) => sft::run(&a, sub),
        Command::Dpo(a) => dpo::run(&a, sub),
        Command::Reward(a) => reward::run(&a, sub),
        Command::Plot(a) => plot::run(&a),
        Command::Bench(a) => bench::run_bench(&a).map(|_| ()),
        Command::Plan(a) => plan::run(&a, sub),
        Command::Entropy(a) => entropy::run(a),
        Command::DidEntropy(a) => did_entropy::run(&a, sub),
        Command::BetaAccuracy(a) => beta_accuracy::run(a),
        Command::Report(a) => report::run(a),
        Command::Merge(a) => merge::run(a),
        Command::ResampleRejected(a) => resample_rejected::run(a),
        Command::BuildPairs(a) => build_pairs::run(a),
    }
}
