//! Avro encoding in the Confluent wire format (magic byte, 4-byte schema id, Avro datum),
//! with schemas registered under TopicRecordNameStrategy so one topic carries many event types.

use std::collections::HashMap;
use std::sync::RwLock;

use apache_avro::writer::datum::GenericDatumWriter;

use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use crate::crypto::Secret;
use crate::error::PipelineError;
use crate::events::{self, erased::ErasedWire, Event, CATALOGUE};
use crate::schemas;
use crate::topics::Topics;

/// HTTP Basic credentials for the Schema Registry. Confluent Schema Registry, Karapace and
/// Apicurio 3 (with `apicurio.authn.basic-client-credentials.enabled`) all accept them.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: Secret<String>,
}

/// By hand, so that no `{:?}` of a config or a codec can print the password.
impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Encodes and decodes medpipe events against one Schema Registry.
pub struct Codec {
    /// The user the registry is called as, to name it when the registry refuses it.
    registry_user: Option<String>,
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    /// Subject strategy per event type; each carries its schema so first use registers it.
    strategies: HashMap<&'static str, SubjectNameStrategy>,
    /// Per event type, once its first encoding went through the registry client: the
    /// schema id and a writer that serializes the event straight into Avro (see `encode`),
    /// or `None` when that did not give the registry client's bytes (decided once).
    direct: RwLock<HashMap<&'static str, Option<Direct>>>,
}

/// An event type's registered schema id, and its writer.
struct Direct {
    id: u32,
    writer: GenericDatumWriter<'static>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("event_types", &self.strategies.len())
            .finish()
    }
}

/// `event` in the Confluent wire format: magic byte 0, the schema id (big-endian), the
/// Avro datum serialized straight from the event's fields.
fn framed(d: &Direct, event: &Event) -> Result<Vec<u8>, apache_avro::Error> {
    let mut out = Vec::with_capacity(512);
    out.push(0);
    out.extend_from_slice(&d.id.to_be_bytes());
    events::with_wire(event, |w: &dyn ErasedWire| {
        w.write_avro(&d.writer, &mut out)
    })?;
    Ok(out)
}

fn sr_error(context: impl Into<String>, e: SRCError) -> PipelineError {
    PipelineError::SchemaRegistry {
        context: context.into(),
        message: e.to_string(),
        retriable: e.retriable,
    }
}

/// The HTTP status of a registry answer that refused the caller: 401 (who you are) or 403
/// (what you may do). `schema_registry_converter` reports a non-success status only in
/// its message ("... failed with status 401 Unauthorized"), in the error or, when it was
/// wrapped, in its cause.
fn refused_status(e: &SRCError) -> Option<u16> {
    const MARK: &str = "failed with status ";
    [Some(e.error.as_str()), e.cause.as_deref()]
        .into_iter()
        .flatten()
        .find_map(|text| {
            let rest = &text[text.find(MARK)? + MARK.len()..];
            let code: u16 = rest.get(..3)?.parse().ok()?;
            matches!(code, 401 | 403).then_some(code)
        })
}

impl Codec {
    /// Builds a codec for the pipeline whose topics are `topics`, calling the registry
    /// without credentials. Makes no network call.
    pub fn new(registry_url: &str, topics: &Topics) -> Result<Self, PipelineError> {
        Self::with_auth(registry_url, topics, None)
    }

    /// [`Codec::new`], calling the registry with HTTP Basic credentials when `auth` is given.
    pub fn with_auth(
        registry_url: &str,
        topics: &Topics,
        auth: Option<&RegistryAuth>,
    ) -> Result<Self, PipelineError> {
        let settings = || {
            let mut builder = SrSettings::new_builder(registry_url.to_string());
            builder
                .no_proxy()
                .set_timeout(std::time::Duration::from_secs(10));
            if let Some(a) = auth {
                builder.set_basic_authorization(&a.username, Some(a.password.expose()));
            }
            builder.build().map_err(|e| sr_error("settings", e))
        };
        let mut strategies = HashMap::new();
        for spec in CATALOGUE {
            let schema = schemas::event_schema(spec)?;
            let supplied = SuppliedSchema::new(Some(spec.full_name()), SchemaType::Avro, schema);
            strategies.insert(
                spec.name,
                SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
                    topics.name(spec.topic),
                    supplied,
                ),
            );
        }
        Ok(Codec {
            registry_user: auth.map(|a| a.username.clone()),
            encoder: AvroEncoder::new(settings()?),
            decoder: AvroDecoder::new(settings()?),
            strategies,
            direct: RwLock::default(),
        })
    }

    /// Registers every event schema, in the catalogue's fixed order. The registry keeps
    /// schemas in memory only, so a fixed order gives the same ids after a registry restart.
    pub async fn register_all(&self) -> Result<(), PipelineError> {
        for spec in CATALOGUE {
            let strategy = self.strategy(spec.name)?;
            let subject = strategy.get_subject().map_err(|e| sr_error(spec.name, e))?;
            self.encoder
                .get_schema_and_id(&subject, strategy.clone())
                .await
                .map_err(|e| self.registry_error(format!("register {subject}"), e))?;
        }
        Ok(())
    }

    /// A failed registry call as our error: a refusal of our credentials is fatal and says
    /// which user was refused (never the password); other failures keep the client's
    /// retriable flag.
    fn registry_error(&self, context: impl Into<String>, e: SRCError) -> PipelineError {
        match refused_status(&e) {
            Some(status) => PipelineError::SchemaRegistryAuth {
                context: context.into(),
                user: self.registry_user.clone(),
                status,
            },
            None => sr_error(context, e),
        }
    }

    fn strategy(&self, event_type: &str) -> Result<&SubjectNameStrategy, PipelineError> {
        self.strategies
            .get(event_type)
            .ok_or_else(|| PipelineError::Encode {
                event_type: event_type.to_string(),
                message: "not in the event catalogue".into(),
            })
    }

    /// Encodes an event in the Confluent wire format.
    ///
    /// The first event of each type goes through the registry client, which registers or
    /// looks up its schema and encodes via an Avro `Value` tree (built, validated, then
    /// written). Its schema is then kept, and later events of the type are serialized
    /// straight into Avro from their fields, with no `Value` tree in between; that first
    /// event is encoded both ways, and a type whose two encodings differ keeps the
    /// registry client's (a logged error, never a wrong byte on a topic).
    pub async fn encode(&self, event: &Event) -> Result<Vec<u8>, PipelineError> {
        let event_type = event.event_type();
        let encode_error = |message: String| PipelineError::Encode {
            event_type: event_type.to_string(),
            message,
        };
        if let Some(bytes) = self.encode_direct(event) {
            return bytes.map_err(|e| encode_error(e.to_string()));
        }
        let strategy = self.strategy(event_type)?;
        let value = events::with_wire(event, |w: &dyn ErasedWire| w.to_avro_value())
            .map_err(|e| encode_error(e.to_string()))?;
        let bytes = self
            .encoder
            .encode_value(value, strategy)
            .await
            .map_err(|e| {
                if e.retriable || refused_status(&e).is_some() {
                    self.registry_error(format!("encode {event_type}"), e)
                } else {
                    encode_error(e.to_string())
                }
            })?;
        self.prepare_direct(event, strategy, &bytes).await;
        Ok(bytes)
    }

    /// The event serialized straight into Avro, once its type has a `Direct` writer.
    fn encode_direct(&self, event: &Event) -> Option<Result<Vec<u8>, apache_avro::Error>> {
        let direct = self.direct.read().ok()?;
        let d = direct.get(event.event_type())?.as_ref()?;
        Some(framed(d, event))
    }

    /// Keeps the schema of `event`'s type for direct serialization, if serializing
    /// `event` directly gives exactly `bytes`, what the registry client wrote.
    async fn prepare_direct(&self, event: &Event, strategy: &SubjectNameStrategy, bytes: &[u8]) {
        let event_type = event.event_type();
        if self
            .direct
            .read()
            .map_or(true, |d| d.contains_key(event_type))
        {
            return;
        }
        let Ok(subject) = strategy.get_subject() else {
            return;
        };
        let Ok(schema) = self
            .encoder
            .get_schema_and_id(&subject, strategy.clone())
            .await
        else {
            return;
        };
        // The registry client keeps its schemas for the life of the process, resolved
        // the same way; this is one more per event type and codec, made once.
        let parsed: &'static apache_avro::Schema = Box::leak(Box::new(schema.parsed.clone()));
        let checked = GenericDatumWriter::builder(parsed)
            .build()
            .and_then(|writer| {
                let d = Direct {
                    id: schema.id,
                    writer,
                };
                framed(&d, event).map(|direct| (direct == bytes).then_some(d))
            });
        let direct = match checked {
            Ok(Some(d)) => Some(d),
            other => {
                tracing::error!(
                    event_type,
                    direct_error = other.err().map(|e| e.to_string()),
                    "Serializing this event type straight into Avro does not give the registry client's bytes; it stays on the registry client's encoder."
                );
                None
            }
        };
        if let Ok(mut map) = self.direct.write() {
            map.insert(event_type, direct);
        }
    }

    /// Decodes a Confluent-framed Avro event. Bad bytes, unknown schema ids and unknown
    /// event types are `Decode` errors (dead-letter); an unreachable registry is retriable.
    pub async fn decode(&self, bytes: &[u8]) -> Result<Event, PipelineError> {
        // A refused credential is the registry's answer about us, not about the message: it
        // must stop the stage, never dead-letter the message.
        let result = self.decoder.decode(Some(bytes)).await.map_err(|e| {
            if e.retriable || refused_status(&e).is_some() {
                self.registry_error("decode", e)
            } else {
                PipelineError::Decode(e.to_string())
            }
        })?;
        let name = result
            .name
            .ok_or_else(|| PipelineError::Decode("message is not an Avro record".into()))?;
        events::from_avro(name.name(), result.value).map_err(PipelineError::Decode)
    }

    /// Forgets cached registry failures, so a retry after an outage reaches the registry.
    pub fn clear_cached_errors(&self) {
        self.encoder.remove_errors_from_cache();
        self.decoder.remove_errors_from_cache();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_401_and_403_from_the_registry_are_refused_credentials() {
        let http = |status: &str| {
            SRCError::new(
                &format!("HTTP request to schema registry failed with status {status}"),
                Some("error code 0".into()),
                false,
            )
        };
        assert_eq!(refused_status(&http("401 Unauthorized")), Some(401));
        assert_eq!(refused_status(&http("403 Forbidden")), Some(403));
        assert_eq!(refused_status(&http("404 Not Found")), None);
        assert_eq!(refused_status(&http("503 Service Unavailable")), None);
        // Wrapped by the client: the status is in the cause.
        let wrapped = SRCError::new(
            "Error posting a reference",
            Some("HTTP request to schema registry failed with status 401 Unauthorized".into()),
            false,
        );
        assert_eq!(refused_status(&wrapped), Some(401));
        let timeout = SRCError::new("http call to schema registry failed", None, true);
        assert_eq!(refused_status(&timeout), None);
    }

    #[test]
    fn registry_credentials_never_show_their_password() {
        let auth = RegistryAuth {
            username: "medpipe-ingestion".into(),
            password: Secret::new("s3cret".into()),
        };
        let shown = format!("{auth:?} {:?}", Some(&auth));
        assert!(shown.contains("medpipe-ingestion"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
