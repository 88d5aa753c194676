//! The job file (TOML): parsing, validation and the commented template.
//!
//! Errors name the field and say what was expected, so an operator can fix the file
//! without reading code.

use phalanx_proto::{JobSpec, ModelPreset, NumericsProfile, Precision};
use thiserror::Error;

/// Sequences per micro-batch in controller-run jobs (`phalanx_train::engine::
/// DEFAULT_MICRO_BATCH`, also checked by a worker test): the global batch is cut into
/// `global_batch / MICRO_BATCH` micro-batches, shared out over the ranks.
pub const MICRO_BATCH: u32 = 2;
const NAME_BYTES_MAX: usize = 64;
const STEPS_MAX: u64 = 100_000_000;
const GLOBAL_BATCH_MAX: u32 = 1 << 20;
const WORLD_SIZE_MAX: u32 = 65_536;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum JobFileError {
    #[error("job file is not valid TOML: {0}")]
    Syntax(String),
    #[error("job file: missing field `{field}` ({expected})")]
    Missing {
        field: &'static str,
        expected: &'static str,
    },
    #[error("job file: field `{field}` has the wrong type: expected {expected}")]
    Type {
        field: String,
        expected: &'static str,
    },
    #[error("job file: field `{field}` is invalid: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("job file: unknown field `{field}` (known fields: {known})")]
    Unknown { field: String, known: String },
}

const FIELDS: &[(&str, &str)] = &[
    ("name", "a string"),
    ("model", "a string"),
    ("corpus", "a string"),
    ("steps", "a positive integer"),
    ("global_batch", "a positive integer"),
    ("seed", "a non-negative integer"),
    ("checkpoint_interval_steps", "a non-negative integer"),
    ("world_size_min", "a positive integer"),
    ("world_size_max", "a positive integer"),
    (
        "numerics",
        "`x86-64-avx2` or `native` (optional; default `x86-64-avx2`)",
    ),
    ("precision", "`fp32` or `bf16` (optional; default `fp32`)"),
];

fn expected_of(field: &'static str) -> &'static str {
    FIELDS
        .iter()
        .find(|(f, _)| *f == field)
        .map(|(_, e)| *e)
        .unwrap_or("a value")
}

fn get_str(t: &toml::Table, field: &'static str) -> Result<String, JobFileError> {
    match t.get(field) {
        None => Err(JobFileError::Missing {
            field,
            expected: expected_of(field),
        }),
        Some(toml::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(JobFileError::Type {
            field: field.into(),
            expected: "a string",
        }),
    }
}

fn get_u64(t: &toml::Table, field: &'static str) -> Result<u64, JobFileError> {
    match t.get(field) {
        None => Err(JobFileError::Missing {
            field,
            expected: expected_of(field),
        }),
        Some(toml::Value::Integer(i)) if *i >= 0 => Ok(*i as u64),
        Some(toml::Value::Integer(i)) => Err(JobFileError::Invalid {
            field,
            message: format!("{i} is negative; expected {}", expected_of(field)),
        }),
        Some(_) => Err(JobFileError::Type {
            field: field.into(),
            expected: expected_of(field),
        }),
    }
}

fn get_u32(t: &toml::Table, field: &'static str) -> Result<u32, JobFileError> {
    let v = get_u64(t, field)?;
    u32::try_from(v).map_err(|_| JobFileError::Invalid {
        field,
        message: format!("{v} is larger than {}", u32::MAX),
    })
}

/// An optional field naming one of `names` (parsed by `parse`): absent means
/// `T::default()`.
fn get_choice<T: Default>(
    t: &toml::Table,
    field: &'static str,
    parse: fn(&str) -> Option<T>,
    names: &[&str],
) -> Result<T, JobFileError> {
    match t.get(field) {
        None => Ok(T::default()),
        Some(toml::Value::String(s)) => parse(s).ok_or_else(|| JobFileError::Invalid {
            field,
            message: format!("{s:?}: expected one of {}", names.join(", ")),
        }),
        Some(_) => Err(JobFileError::Type {
            field: field.into(),
            expected: "a string",
        }),
    }
}

/// The required `model` field: one of the presets.
fn get_model(t: &toml::Table) -> Result<ModelPreset, JobFileError> {
    let s = get_str(t, "model")?;
    ModelPreset::parse(&s).ok_or_else(|| JobFileError::Invalid {
        field: "model",
        message: format!("{s:?}: expected one of {}", ModelPreset::names()),
    })
}

/// The optional `numerics` field: absent means the default profile.
fn get_numerics(t: &toml::Table) -> Result<NumericsProfile, JobFileError> {
    let names = NumericsProfile::ALL.map(|p| p.as_str());
    get_choice(t, "numerics", NumericsProfile::parse, &names)
}

/// The optional `precision` field: absent means fp32.
fn get_precision(t: &toml::Table) -> Result<Precision, JobFileError> {
    let names = Precision::ALL.map(|p| p.as_str());
    get_choice(t, "precision", Precision::parse, &names)
}

/// Parse and validate a job file.
pub fn parse_job_toml(text: &str) -> Result<JobSpec, JobFileError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        JobFileError::Syntax(e.to_string().trim().replace('\n', " "))
    })?;
    for key in table.keys() {
        if !FIELDS.iter().any(|(f, _)| f == key) {
            return Err(JobFileError::Unknown {
                field: key.clone(),
                known: FIELDS
                    .iter()
                    .map(|(f, _)| *f)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let spec = JobSpec {
        name: get_str(&table, "name")?,
        model: get_model(&table)?,
        corpus: get_str(&table, "corpus")?,
        steps: get_u64(&table, "steps")?,
        global_batch: get_u32(&table, "global_batch")?,
        seed: get_u64(&table, "seed")?,
        checkpoint_interval_steps: get_u64(&table, "checkpoint_interval_steps")?,
        world_size_min: get_u32(&table, "world_size_min")?,
        world_size_max: get_u32(&table, "world_size_max")?,
        numerics: get_numerics(&table)?,
        precision: get_precision(&table)?,
    };
    validate_job(&spec)?;
    Ok(spec)
}

/// Validate a job spec (also applied to specs that arrive as JSON over the API).
pub fn validate_job(spec: &JobSpec) -> Result<(), JobFileError> {
    let inv = |field: &'static str, message: String| Err(JobFileError::Invalid { field, message });
    if spec.name.is_empty() || spec.name.len() > NAME_BYTES_MAX {
        return inv("name", format!("expected 1..={NAME_BYTES_MAX} characters"));
    }
    if !spec
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return inv(
            "name",
            format!("{:?}: use letters, digits, '-', '_' or '.'", spec.name),
        );
    }
    if spec.corpus.trim().is_empty() {
        return inv(
            "corpus",
            "expected `default`, a file, a directory or a glob".into(),
        );
    }
    if spec.steps == 0 || spec.steps > STEPS_MAX {
        return inv("steps", format!("{}: expected 1..={STEPS_MAX}", spec.steps));
    }
    if spec.world_size_min == 0 || spec.world_size_min > WORLD_SIZE_MAX {
        return inv(
            "world_size_min",
            format!("{}: expected 1..={WORLD_SIZE_MAX}", spec.world_size_min),
        );
    }
    if spec.world_size_max < spec.world_size_min || spec.world_size_max > WORLD_SIZE_MAX {
        return inv(
            "world_size_max",
            format!(
                "{}: expected world_size_min ({})..={WORLD_SIZE_MAX}",
                spec.world_size_max, spec.world_size_min
            ),
        );
    }
    if spec.global_batch == 0 || spec.global_batch > GLOBAL_BATCH_MAX {
        return inv(
            "global_batch",
            format!("{}: expected 1..={GLOBAL_BATCH_MAX}", spec.global_batch),
        );
    }
    if spec.global_batch % MICRO_BATCH != 0 || spec.global_batch / MICRO_BATCH < spec.world_size_max
    {
        return inv(
            "global_batch",
            format!(
                "{}: expected a multiple of the micro-batch ({MICRO_BATCH}) with at least one \
                 micro-batch per rank of world_size_max ({}), i.e. at least {}",
                spec.global_batch,
                spec.world_size_max,
                MICRO_BATCH * spec.world_size_max
            ),
        );
    }
    if spec.checkpoint_interval_steps > spec.steps {
        return inv(
            "checkpoint_interval_steps",
            format!(
                "{} is larger than steps ({})",
                spec.checkpoint_interval_steps, spec.steps
            ),
        );
    }
    Ok(())
}

/// A complete, commented job file to start from (`phalanx job init`).
pub fn job_template(model: &str, steps: u64) -> Result<String, JobFileError> {
    let interval = (steps / 4).max(1);
    let text = format!(
        r#"# Phalanx job file. Submit it with `phalanx job submit FILE`.
# Every field but `numerics` and `precision` is required; `phalanx job submit` names any field it rejects.

# Job name: letters, digits, '-', '_' or '.' (at most 64 characters).
name = "{model}-{steps}"

# Model preset: one of {models}.
model = "{model}"

# Training text, read by every worker: `default` (the C++ headers of the pinned libtorch,
# present after `just setup`), or a file, a directory or a glob.
corpus = "default"

# Optimizer steps to run.
steps = {steps}

# Sequences per step, summed over all ranks. The result does not depend on the world
# size. It is cut into micro-batches of {micro} sequences, at least one per rank of
# world_size_max: a multiple of {micro} and at least {micro} x world_size_max ({min} here).
# `phalanx train` and `phalanx demo` use 8 too, so this job reproduces their runs.
global_batch = 8

# Seed of the model init and the data sampler: (job file, seed) reproduces the run.
seed = 7

# Write a checkpoint every this many steps (0 = never).
checkpoint_interval_steps = {interval}

# Run with at least this many workers, and use at most this many. Between them the job
# re-shards elastically when workers fail or join.
world_size_min = 1
world_size_max = 4

# Numerics profile (optional): `x86-64-avx2`, the default, pins the CPU libraries to
# their AVX2 kernels so that machines with one vendor's x86-64 CPUs compute the same
# bits (AMD and Intel still differ; docs/training.md); `native` lets
# them pick the fastest kernels of each CPU (not portable). Only workers started with
# the job's profile get a rank.
numerics = "x86-64-avx2"

# Arithmetic of the forward and backward passes (optional): `fp32`, the default, or
# `bf16` (bfloat16 matrix products and attention; the master weights, the reduced
# gradients and the AdamW moments stay fp32). Every rank trains in it, and the result
# is the same bits for any world size in either.
precision = "fp32"
"#,
        models = ModelPreset::names(),
        micro = MICRO_BATCH,
        min = MICRO_BATCH * 4,
    );
    parse_job_toml(&text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> String {
        job_template("tiny", 60).unwrap()
    }

    #[test]
    fn template_parses() {
        let spec = parse_job_toml(&template()).unwrap();
        assert_eq!(spec.model, ModelPreset::Tiny);
        assert_eq!(spec.steps, 60);
        assert_eq!(spec.checkpoint_interval_steps, 15);
    }

    #[test]
    fn bad_model_template_is_rejected() {
        let err = job_template("huge", 60).unwrap_err();
        assert!(err.to_string().contains("`model`"), "{err}");
    }

    fn with(replace: &str, by: &str) -> Result<JobSpec, JobFileError> {
        let t = template();
        assert!(t.contains(replace), "template lacks {replace}");
        parse_job_toml(&t.replace(replace, by))
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("steps = 60", "steps = 0", "`steps`"),
            ("steps = 60", "steps = -3", "`steps`"),
            ("steps = 60", "steps = \"sixty\"", "`steps`"),
            ("steps = 60\n", "", "`steps`"),
            ("model = \"tiny\"", "model = \"gpt5\"", "`model`"),
            (
                "world_size_min = 1",
                "world_size_min = 9",
                "`world_size_max`",
            ),
            (
                "world_size_min = 1",
                "world_size_min = 0",
                "`world_size_min`",
            ),
            ("global_batch = 8", "global_batch = 2", "`global_batch`"),
            ("seed = 7", "seed = 7\nsede = 8", "`sede`"),
            ("name = \"tiny-60\"", "name = \"bad name!\"", "`name`"),
            (
                "numerics = \"x86-64-avx2\"",
                "numerics = \"avx512\"",
                "`numerics`",
            ),
            ("numerics = \"x86-64-avx2\"", "numerics = 2", "`numerics`"),
            (
                "precision = \"fp32\"",
                "precision = \"fp16\"",
                "`precision`",
            ),
            ("precision = \"fp32\"", "precision = true", "`precision`"),
            (
                "checkpoint_interval_steps = 15",
                "checkpoint_interval_steps = 61",
                "`checkpoint_interval_steps`",
            ),
        ];
        for (from, to, field) in cases {
            let err = with(from, to).unwrap_err().to_string();
            assert!(err.contains(field), "replacing {from:?} by {to:?}: {err}");
        }
    }

    #[test]
    fn numerics_is_optional_and_parsed() {
        assert_eq!(
            parse_job_toml(&template()).unwrap().numerics,
            NumericsProfile::X86_64Avx2
        );
        let old = template().replace("numerics = \"x86-64-avx2\"\n", "");
        assert!(!old.contains("numerics ="));
        assert_eq!(
            parse_job_toml(&old).unwrap().numerics,
            NumericsProfile::X86_64Avx2
        );
        assert_eq!(
            with("numerics = \"x86-64-avx2\"", "numerics = \"native\"")
                .unwrap()
                .numerics,
            NumericsProfile::Native
        );
        // A job spec from an older client (JSON without the field) still deserialises.
        let mut v = serde_json::to_value(parse_job_toml(&template()).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("numerics");
        let spec: JobSpec = serde_json::from_value(v).unwrap();
        assert_eq!(spec.numerics, NumericsProfile::X86_64Avx2);
    }

    #[test]
    fn precision_is_optional_and_parsed() {
        assert_eq!(
            parse_job_toml(&template()).unwrap().precision,
            Precision::Fp32
        );
        let old = template().replace("precision = \"fp32\"\n", "");
        assert!(!old.contains("precision ="));
        assert_eq!(parse_job_toml(&old).unwrap().precision, Precision::Fp32);
        assert_eq!(
            with("precision = \"fp32\"", "precision = \"bf16\"")
                .unwrap()
                .precision,
            Precision::Bf16
        );
        let err = with("precision = \"fp32\"", "precision = \"fp16\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"fp16\": expected one of fp32, bf16"),
            "{err}"
        );
        // A job spec from an older client (JSON without the field) still deserialises.
        let mut v = serde_json::to_value(parse_job_toml(&template()).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("precision");
        let spec: JobSpec = serde_json::from_value(v).unwrap();
        assert_eq!(spec.precision, Precision::Fp32);
    }

    #[test]
    fn syntax_error_is_an_error_not_a_panic() {
        assert!(matches!(
            parse_job_toml("steps = = 3"),
            Err(JobFileError::Syntax(_))
        ));
        assert!(parse_job_toml("").is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = parse_job_toml(&s);
        }
    }
}
