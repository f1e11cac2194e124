//! Command-line and environment configuration shared by every stage binary.
//! Each field has an `env = "MEDPIPE_..."` twin, since Kubernetes injects env.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::codec::{Codec, RegistryAuth};
use crate::crypto::{KeyRef, Secret};
use crate::error::PipelineError;
use crate::kafka::{Connection, SaslAuth};
use crate::topics::Topics;

/// Where Kafka and the Schema Registry are, and which topics this pipeline uses.
#[derive(clap::Args, Debug, Clone)]
pub struct KafkaArgs {
    #[arg(
        long,
        env = "MEDPIPE_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub bootstrap_servers: String,
    #[arg(
        long,
        env = "MEDPIPE_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub schema_registry_url: String,
    /// The Schema Registry user (HTTP Basic); unset, the registry is called without
    /// credentials. With Apicurio backed by an OIDC provider, the client id.
    #[arg(
        long,
        env = "MEDPIPE_SCHEMA_REGISTRY_USERNAME",
        requires = "schema_registry_password_file"
    )]
    pub schema_registry_username: Option<String>,
    /// A file holding the Schema Registry password (a mounted secret); never the password
    /// itself. One trailing newline is ignored.
    #[arg(
        long,
        env = "MEDPIPE_SCHEMA_REGISTRY_PASSWORD_FILE",
        requires = "schema_registry_username"
    )]
    pub schema_registry_password_file: Option<PathBuf>,
    /// All topic names start with this prefix (`<prefix>.ingestion.v1`, ...).
    #[arg(long, env = "MEDPIPE_TOPIC_PREFIX", default_value = "medpipe")]
    pub topic_prefix: String,
    /// Partitions for topics this process creates when they are missing.
    #[arg(long, env = "MEDPIPE_TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,
    /// Replication factor for topics this process creates.
    #[arg(long, env = "MEDPIPE_TOPIC_REPLICATION", default_value_t = 1)]
    pub topic_replication: i32,
    /// Extra configs for created topics, `key=value`, e.g. `retention.ms=604800000`
    /// (comma-separated in the environment variable).
    #[arg(long = "topic-config", env = "MEDPIPE_TOPIC_CONFIGS", value_delimiter = ',', value_parser = parse_key_value)]
    pub topic_configs: Vec<(String, String)>,
    /// SASL mechanism to authenticate to the brokers with (`SCRAM-SHA-512`,
    /// `SCRAM-SHA-256` or `PLAIN`); unset, clients connect without authentication.
    #[arg(long, env = "MEDPIPE_KAFKA_SASL_MECHANISM", requires_all = ["kafka_sasl_username", "kafka_sasl_password_file"])]
    pub kafka_sasl_mechanism: Option<String>,
    /// The SASL user: one per stage, so the brokers' ACLs can hold each stage to its own
    /// topics, groups and transactional ids.
    #[arg(
        long,
        env = "MEDPIPE_KAFKA_SASL_USERNAME",
        requires = "kafka_sasl_mechanism"
    )]
    pub kafka_sasl_username: Option<String>,
    /// A file holding the SASL password (a mounted secret); never the password itself.
    #[arg(
        long,
        env = "MEDPIPE_KAFKA_SASL_PASSWORD_FILE",
        requires = "kafka_sasl_mechanism"
    )]
    pub kafka_sasl_password_file: Option<PathBuf>,
    /// The CA certificate (PEM) of the brokers' TLS listener; with SASL, clients then
    /// speak SASL_SSL.
    #[arg(
        long,
        env = "MEDPIPE_KAFKA_TLS_CA_FILE",
        requires = "kafka_sasl_mechanism"
    )]
    pub kafka_tls_ca_file: Option<PathBuf>,
}

/// Parses `key=value`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

impl KafkaArgs {
    /// How topics this process creates are laid out.
    pub fn topic_layout(&self) -> crate::topics::TopicLayout {
        crate::topics::TopicLayout {
            partitions: self.topic_partitions,
            replication: self.topic_replication,
            configs: self.topic_configs.clone(),
        }
    }

    pub fn topics(&self) -> Topics {
        Topics::new(self.topic_prefix.clone())
    }

    /// The Schema Registry credentials, if configured. Reads the password file, so a
    /// missing, unreadable or empty one fails at start-up with its path named (never its
    /// content).
    pub fn registry_auth(&self) -> Result<Option<RegistryAuth>, PipelineError> {
        const TOGETHER: &str =
            "--schema-registry-username and --schema-registry-password-file go together";
        let (username, path) = match (
            &self.schema_registry_username,
            &self.schema_registry_password_file,
        ) {
            (Some(u), Some(p)) => (u, p),
            (None, None) => return Ok(None),
            _ => return Err(PipelineError::Config(TOGETHER.into())),
        };
        // RFC 7617: the user-id of Basic credentials cannot hold a colon.
        if username.is_empty() || username.contains(':') {
            return Err(PipelineError::Config(
                "--schema-registry-username must be non-empty and contain no ':'".into(),
            ));
        }
        let password = std::fs::read_to_string(path).map_err(|e| {
            PipelineError::Config(format!(
                "cannot read the Schema Registry password file {}: {e}",
                path.display()
            ))
        })?;
        // Exactly one line end, as `echo` or `openssl rand` leave it in the file.
        let password = password
            .strip_suffix('\n')
            .map(|p| p.strip_suffix('\r').unwrap_or(p))
            .unwrap_or(&password);
        if password.is_empty() {
            return Err(PipelineError::Config(format!(
                "the Schema Registry password file {} is empty",
                path.display()
            )));
        }
        Ok(Some(RegistryAuth {
            username: username.clone(),
            password: Secret::new(password.to_string()),
        }))
    }

    /// A codec for `topics` on the configured registry, with its credentials if any.
    /// Makes no network call, but reads the password file.
    pub fn codec(&self, topics: &Topics) -> Result<Codec, PipelineError> {
        Codec::with_auth(
            &self.schema_registry_url,
            topics,
            self.registry_auth()?.as_ref(),
        )
    }

    /// The brokers and this process's credentials. Reads the password file, so a missing
    /// or empty one fails at start-up with its path named.
    pub fn connection(&self) -> Result<Connection, PipelineError> {
        let auth = match (&self.kafka_sasl_mechanism, &self.kafka_sasl_username) {
            (Some(mechanism), Some(username)) => {
                const KNOWN: [&str; 3] = ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"];
                if !KNOWN.contains(&mechanism.as_str()) {
                    return Err(PipelineError::Config(format!(
                        "--kafka-sasl-mechanism must be one of {}, got {mechanism:?}",
                        KNOWN.join(", ")
                    )));
                }
                let path = self.kafka_sasl_password_file.as_ref().ok_or_else(|| {
                    PipelineError::Config("--kafka-sasl-password-file is required with SASL".into())
                })?;
                let password = std::fs::read_to_string(path).map_err(|e| {
                    PipelineError::Config(format!(
                        "cannot read the SASL password file {}: {e}",
                        path.display()
                    ))
                })?;
                let password = password.trim_end_matches(['\r', '\n']).to_string();
                if password.is_empty() {
                    return Err(PipelineError::Config(format!(
                        "the SASL password file {} is empty",
                        path.display()
                    )));
                }
                Some(SaslAuth {
                    mechanism: mechanism.clone(),
                    username: username.clone(),
                    password: Secret::new(password),
                    tls_ca: self.kafka_tls_ca_file.clone(),
                })
            }
            (None, None) => None,
            _ => {
                return Err(PipelineError::Config(
                    "--kafka-sasl-mechanism and --kafka-sasl-username go together".into(),
                ))
            }
        };
        Ok(Connection {
            bootstrap: self.bootstrap_servers.clone(),
            auth,
        })
    }

    pub fn validate(&self) -> Result<(), PipelineError> {
        if self.topic_partitions < 1 {
            return Err(PipelineError::Config(
                "--topic-partitions must be at least 1".into(),
            ));
        }
        if self.topic_replication < 1 {
            return Err(PipelineError::Config(
                "--topic-replication must be at least 1".into(),
            ));
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(char::is_whitespace) {
            return Err(PipelineError::Config(
                "--topic-prefix must be non-empty and contain no spaces".into(),
            ));
        }
        Ok(())
    }
}

/// How the transactional runner batches work.
#[derive(clap::Args, Debug, Clone)]
pub struct RunnerArgs {
    /// Distinguishes replicas of one stage; part of the transactional id, so it must be
    /// stable across restarts of the same replica (a StatefulSet ordinal, for example).
    #[arg(long, env = "MEDPIPE_INSTANCE_ID", default_value = "0")]
    pub instance_id: String,
    /// Consumer group; defaults to `<topic prefix>-<stage>`.
    #[arg(long, env = "MEDPIPE_GROUP_ID")]
    pub group_id: Option<String>,
    /// Most input messages in one transaction.
    #[arg(long, env = "MEDPIPE_BATCH_MAX_MESSAGES", default_value_t = 5000)]
    pub batch_max_messages: usize,
    /// Longest time spent collecting one transaction's input.
    #[arg(long, env = "MEDPIPE_BATCH_MAX_WAIT", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub batch_max_wait: Duration,
    #[arg(long, env = "MEDPIPE_TRANSACTION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub transaction_timeout: Duration,
    /// How long a stage holds a batch whose closing event came before all its records
    /// (the counts do not add up yet) before it fails the batch with `counts_mismatch`.
    #[arg(long, env = "MEDPIPE_BATCH_CLOSE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub batch_close_timeout: Duration,
    /// Upper bound of librdkafka's prefetch queue, so a slow stage has bounded memory.
    #[arg(long, env = "MEDPIPE_QUEUED_MAX_KBYTES", default_value_t = 16384)]
    pub queued_max_kbytes: u32,
}

impl RunnerArgs {
    pub fn validate(&self) -> Result<(), PipelineError> {
        if self.batch_max_messages == 0 {
            return Err(PipelineError::Config(
                "--batch-max-messages must be at least 1".into(),
            ));
        }
        if self.transaction_timeout < Duration::from_secs(2) {
            return Err(PipelineError::Config(
                "--transaction-timeout must be at least 2s".into(),
            ));
        }
        if self.batch_max_wait * 4 > self.transaction_timeout {
            return Err(PipelineError::Config(
                "--batch-max-wait must be well below --transaction-timeout (at most a quarter)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Metrics endpoint and log format.
#[derive(clap::Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// Address for /metrics, /healthz and /readyz. Port 0 picks a free port (logged).
    #[arg(long, env = "MEDPIPE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[arg(long, env = "MEDPIPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A 32-byte key given inline (hex) or as a file holding the hex, with its id.
#[derive(Debug, Clone)]
pub struct KeySource {
    pub id: String,
    pub hex: Option<Secret<String>>,
    pub file: Option<PathBuf>,
}

impl KeySource {
    /// Loads the key; `what` names it in errors (e.g. "--master-key").
    pub fn load(&self, what: &str) -> Result<KeyRef, PipelineError> {
        let hex = match (&self.hex, &self.file) {
            (Some(h), None) => h.expose().clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| PipelineError::io(path.display().to_string(), e))?,
            (Some(_), Some(_)) => {
                return Err(PipelineError::Config(format!(
                    "give {what} inline or as a file, not both"
                )))
            }
            (None, None) => {
                return Err(PipelineError::Config(format!(
                    "{what} is required (64 hex characters, or {what}-file)"
                )))
            }
        };
        KeyRef::from_hex(&self.id, &hex)
    }
}

/// The master key that wraps each batch's data key: ingestion seals with it,
/// anonymization opens with it.
#[derive(clap::Args, Debug, Clone)]
pub struct MasterKeyArgs {
    #[arg(long, env = "MEDPIPE_MASTER_KEY_ID", default_value = "master-1")]
    pub master_key_id: String,
    /// 64 hex characters. Prefer --master-key-file in production.
    #[arg(long, env = "MEDPIPE_MASTER_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub master_key: Option<Secret<String>>,
    #[arg(long, env = "MEDPIPE_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
}

impl MasterKeyArgs {
    pub fn load(&self) -> Result<KeyRef, PipelineError> {
        KeySource {
            id: self.master_key_id.clone(),
            hex: self.master_key.clone(),
            file: self.master_key_file.clone(),
        }
        .load("--master-key")
    }
}

/// The AES-256-GCM key that seals sensitive details of audit entries: the auditing stage
/// seals with it, `medpipe audit trace --unseal` opens with it.
#[derive(clap::Args, Debug, Clone)]
pub struct AuditKeyArgs {
    #[arg(long, env = "MEDPIPE_AUDIT_KEY_ID", default_value = "audit-1")]
    pub audit_key_id: String,
    /// 64 hex characters. Prefer --audit-key-file in production.
    #[arg(long, env = "MEDPIPE_AUDIT_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub audit_key: Option<Secret<String>>,
    #[arg(long, env = "MEDPIPE_AUDIT_KEY_FILE")]
    pub audit_key_file: Option<PathBuf>,
}

impl AuditKeyArgs {
    pub fn load(&self) -> Result<KeyRef, PipelineError> {
        KeySource {
            id: self.audit_key_id.clone(),
            hex: self.audit_key.clone(),
            file: self.audit_key_file.clone(),
        }
        .load("--audit-key")
    }
}

/// clap value parser that wraps the value so it never shows in `Debug`.
pub fn parse_secret(s: &str) -> Result<Secret<String>, String> {
    Ok(Secret::new(s.to_string()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    fn parse(args: &[&str]) -> Result<KafkaArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("medpipe").chain(args.iter().copied())).map(|c| c.kafka)
    }

    fn auth_from(
        password_file_content: &str,
    ) -> (
        tempfile::TempDir,
        Result<Option<RegistryAuth>, PipelineError>,
    ) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("password");
        std::fs::write(&path, password_file_content).unwrap_or_else(|e| panic!("write: {e}"));
        let path = path.to_string_lossy().into_owned();
        let args = parse(&[
            "--schema-registry-username",
            "medpipe-ingestion",
            "--schema-registry-password-file",
            &path,
        ])
        .unwrap_or_else(|e| panic!("parse: {e}"));
        (dir, args.registry_auth())
    }

    #[test]
    fn registry_username_and_password_file_come_together_or_not_at_all() {
        let none = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(none.registry_auth(), Ok(None)));
        let e = parse(&["--schema-registry-username", "u"])
            .err()
            .map(|e| e.kind());
        assert_eq!(e, Some(clap::error::ErrorKind::MissingRequiredArgument));
        let e = parse(&["--schema-registry-password-file", "/p"])
            .err()
            .map(|e| e.kind());
        assert_eq!(e, Some(clap::error::ErrorKind::MissingRequiredArgument));
    }

    #[test]
    fn the_registry_password_file_loses_one_line_end_only() {
        for (content, password) in [
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("s3cret", "s3cret"),
            ("s3cret\n\n", "s3cret\n"),
            (" s3cret \n", " s3cret "),
        ] {
            let (_dir, auth) = auth_from(content);
            let auth = auth
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("auth"));
            assert_eq!(auth.username, "medpipe-ingestion");
            assert_eq!(auth.password.expose(), password, "from {content:?}");
            let debug = format!("{auth:?}");
            assert!(
                debug.contains("medpipe-ingestion") && !debug.contains("s3cret"),
                "{debug}"
            );
        }
    }

    #[test]
    fn an_empty_or_unreadable_registry_password_file_is_a_config_error_naming_the_path() {
        for content in ["", "\n"] {
            let (dir, auth) = auth_from(content);
            let e = auth
                .err()
                .unwrap_or_else(|| panic!("{content:?} must be refused"));
            assert!(matches!(e, PipelineError::Config(_)));
            assert!(
                e.to_string()
                    .contains(&dir.path().join("password").display().to_string()),
                "{e}"
            );
            assert!(e.to_string().contains("is empty"), "{e}");
        }
        let args = parse(&[
            "--schema-registry-username",
            "u",
            "--schema-registry-password-file",
            "/nonexistent/medpipe/registry-password",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let e = args
            .registry_auth()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cannot read the Schema Registry password file /nonexistent/medpipe/registry-password"), "{e}");
        let colon = parse(&[
            "--schema-registry-username",
            "a:b",
            "--schema-registry-password-file",
            "/p",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            colon.registry_auth(),
            Err(PipelineError::Config(_))
        ));
    }
}
