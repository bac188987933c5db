//! `difinfo`: the command line of the library. `difinfo synth <experiment|all>` runs the synthetic
//! experiments of Sections 3.5 and 4 and writes their series, figures, instances, learned logits
//! and `summary.{json,md}` under `--out` (default `out/synth`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Instant;

use clap::builder::PossibleValue;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use difinfo::synthetic::{run_and_write, Experiment, SynthConfig};

#[derive(Parser)]
#[command(
    name = "difinfo",
    version,
    about = "Differential information: executable theory of preference optimization"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the synthetic energy-based experiments (Sections 3.5 and 4).
    ///
    /// Instances: f_ref = scale·z with z ~ N(0, I_N), f* = f_ref/τ, π_l from Eq. 1 with β;
    /// pairs y_w ~ π_ref, y_l ~ π_l. Population mode minimizes the exact expected loss
    /// (L-BFGS); sampled mode draws minibatches and uses RMSprop with a constant learning rate
    /// and gradient-norm clipping. Every file is written atomically; the same seed gives
    /// bit-identical files. Each experiment writes DIR/<experiment>/: series (*.csv), figures
    /// (*.png, *.svg), instance.json, final_logits.json, result.json; then DIR/summary.json and
    /// DIR/summary.md are rebuilt from every result.json in DIR.
    ///
    /// Defaults are the full run (about 5 minutes on 2 cores); --quick (under a minute) lowers
    /// steps to 10000, lr to 2e-3, L-BFGS iterations to 1000, records to 25, the claim-map grid
    /// to 20 × 11, prompts to 32 and Monte Carlo samples to 4000, unless those flags are given.
    ///
    /// Example: difinfo synth all --quick --out out/synth
    Synth(SynthArgs),
}

/// The experiment argument: one of the library's [`Experiment::ALL`] (its name and help from
/// [`Experiment::name`] and [`Experiment::about`]), or `all`.
#[derive(Clone, Copy)]
enum Which {
    One(Experiment),
    All,
}

impl ValueEnum for Which {
    fn value_variants<'a>() -> &'a [Self] {
        static VARIANTS: OnceLock<Vec<Which>> = OnceLock::new();
        VARIANTS.get_or_init(|| {
            Experiment::ALL
                .into_iter()
                .map(Which::One)
                .chain([Which::All])
                .collect()
        })
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Which::One(e) => PossibleValue::new(e.name()).help(e.about()),
            Which::All => PossibleValue::new("all").help("All eight, in this order"),
        })
    }
}

#[derive(Args)]
struct SynthArgs {
    /// Which experiment.
    #[arg(value_enum)]
    experiment: Which,
    /// Output folder: DIR/<experiment>/ and DIR/summary.{json,md}.
    #[arg(long, default_value = "out/synth")]
    out: PathBuf,
    /// Fast settings (under 2 minutes for `all`); explicit flags still override them.
    #[arg(long)]
    quick: bool,
    /// Seed of every instance, minibatch and Monte Carlo sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of classes N.
    #[arg(long, default_value_t = 128)]
    n: usize,
    /// Logit scale s: f_ref = s·z.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Reinforcing temperature of the default instance, 0 < τ < 1.
    #[arg(long, default_value_t = 0.4)]
    tau: f64,
    /// Smoothing temperature, τ > 1 (did-fit, entropy, beta-accuracy).
    #[arg(long, default_value_t = 2.0)]
    tau_smooth: f64,
    /// β of the data (Eq. 1) and of DPO.
    #[arg(long, default_value_t = 0.25)]
    beta: f64,
    /// The mismatched β' of the dpo-beta-mismatch objective.
    #[arg(long, default_value_t = 2.0)]
    beta_mismatch: f64,
    /// did-fit's β values (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,1,2")]
    did_fit_betas: Vec<f64>,
    /// The strong-contrast rejected distribution is Eq. 1 with contrast·β.
    #[arg(long, default_value_t = 4.0)]
    contrast: f64,
    /// Sampled-mode optimizer steps [default: 50000; --quick 10000].
    #[arg(long)]
    steps: Option<usize>,
    /// Pairs per step (per prompt).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Constant RMSprop learning rate [default: 1e-3; --quick 2e-3].
    #[arg(long)]
    lr: Option<f64>,
    /// RMSprop α.
    #[arg(long, default_value_t = 0.99)]
    rms_alpha: f64,
    /// RMSprop ε.
    #[arg(long, default_value_t = 1e-8)]
    rms_eps: f64,
    /// Global gradient-norm clipping threshold.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Population-mode L-BFGS iteration budget [default: 3000; --quick 1000].
    #[arg(long)]
    pop_iters: Option<usize>,
    /// Recorded points per curve [default: 100; --quick 25].
    #[arg(long)]
    records: Option<usize>,
    /// claim-map: τ grid size, log-spaced in [0.1, 10] [default: 40; --quick 20].
    #[arg(long)]
    grid_tau: Option<usize>,
    /// claim-map: logit-scale grid size, log-spaced in [0.1, 10] [default: 31; --quick 11].
    #[arg(long)]
    grid_scale: Option<usize>,
    /// beta-accuracy: number of prompts P [default: 64; --quick 32].
    #[arg(long)]
    prompts: Option<usize>,
    /// beta-accuracy: samples per prompt for the β fit (Appendix K.1: 4).
    #[arg(long, default_value_t = 4)]
    beta_samples: usize,
    /// did-entropy: Monte Carlo samples [default: 20000; --quick 4000].
    #[arg(long)]
    mc_samples: Option<usize>,
    /// did-entropy: the τ values (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.25,0.4,0.6,0.8,1.25,2,4"
    )]
    did_entropy_taus: Vec<f64>,
    /// loss-atlas: classes N of the β × τ grid (the default instance uses --n) [default: 32;
    /// --quick 16].
    #[arg(long)]
    atlas_n: Option<usize>,
    /// loss-atlas: the grid's β values (comma separated) [default: 0.1,0.25,0.5,1,2; --quick
    /// 0.25,1].
    #[arg(long, value_delimiter = ',')]
    atlas_betas: Option<Vec<f64>>,
    /// loss-atlas: the grid's τ values (comma separated) [default: 0.25,0.4,0.6,1.5,3;
    /// --quick 0.4,2].
    #[arg(long, value_delimiter = ',')]
    atlas_taus: Option<Vec<f64>>,
}

impl SynthArgs {
    fn config(&self) -> SynthConfig {
        let mut c = if self.quick {
            SynthConfig::quick()
        } else {
            SynthConfig::default()
        };
        c.seed = self.seed;
        c.n = self.n;
        c.scale = self.scale;
        c.tau = self.tau;
        c.tau_smooth = self.tau_smooth;
        c.beta = self.beta;
        c.beta_mismatch = self.beta_mismatch;
        c.did_fit_betas = self.did_fit_betas.clone();
        c.contrast = self.contrast;
        c.train.batch = self.batch;
        c.train.alpha = self.rms_alpha;
        c.train.eps = self.rms_eps;
        c.train.clip = self.clip;
        c.beta_samples = self.beta_samples;
        c.did_entropy_taus = self.did_entropy_taus.clone();
        if let Some(v) = self.steps {
            c.train.steps = v;
        }
        if let Some(v) = self.lr {
            c.train.lr = v;
        }
        if let Some(v) = self.pop_iters {
            c.train.pop_iters = v;
        }
        if let Some(v) = self.records {
            c.train.records = v;
        }
        if let Some(v) = self.grid_tau {
            c.grid_tau = v;
        }
        if let Some(v) = self.grid_scale {
            c.grid_scale = v;
        }
        if let Some(v) = self.prompts {
            c.prompts = v;
        }
        if let Some(v) = self.mc_samples {
            c.mc_samples = v;
        }
        if let Some(v) = self.atlas_n {
            c.atlas_n = v;
        }
        if let Some(v) = &self.atlas_betas {
            c.atlas_betas = v.clone();
        }
        if let Some(v) = &self.atlas_taus {
            c.atlas_taus = v.clone();
        }
        c
    }
}

/// `cmd` with its numeric flags (and its subcommands') taking values that start with a
/// hyphen, so `--beta -1` reaches [`SynthConfig::validate`]'s message instead of clap's
/// "unexpected argument '-1'" (difinfo-train's front end does the same for its options).
fn hyphen_numbers(cmd: clap::Command) -> clap::Command {
    use std::any::TypeId;
    let numeric = [
        TypeId::of::<f64>(),
        TypeId::of::<usize>(),
        TypeId::of::<u64>(),
    ];
    cmd.mut_args(|a| {
        if numeric.iter().any(|n| a.get_value_parser().type_id() == *n) {
            a.allow_hyphen_values(true)
        } else {
            a
        }
    })
    .mut_subcommands(hyphen_numbers)
}

fn main() -> ExitCode {
    let matches = hyphen_numbers(<Cli as clap::CommandFactory>::command()).get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let Command::Synth(args) = cli.command;
    let experiments: Vec<Experiment> = match args.experiment {
        Which::One(e) => vec![e],
        Which::All => Experiment::ALL.to_vec(),
    };
    let cfg = args.config();
    let pb = if std::io::stderr().is_terminal() {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len}  {msg}",
            )
            .expect("valid template"),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    match run_and_write(&experiments, &cfg, &args.out, &pb) {
        Ok(_) => {
            pb.finish_and_clear();
            println!(
                "difinfo synth: wrote {} ({} experiment(s), {:.1} s); see {}",
                args.out.display(),
                experiments.len(),
                start.elapsed().as_secs_f64(),
                args.out.join("summary.md").display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            pb.abandon();
            eprintln!("difinfo synth: error: {e}");
            ExitCode::FAILURE
        }
    }
}
