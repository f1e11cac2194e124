//! The canonical resource types: declared once (the `resource_types!` list in
//! `events.rs`, beside their events). Each one's FHIR name, topic and event type follow
//! from that list; a `match` over `ResourceType` is exhaustive, so
//! adding a type fails to compile until canonization maps it (ARCHITECTURE.md, "How to
//! add...").

macro_rules! resource_types {
    ($($variant:ident => $topic:literal,)*) => {
        /// A FHIR R4 resource type of the canonical model; nothing else is ever emitted.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ResourceType {
            $($variant,)*
        }

        impl ResourceType {
            /// Every canonical type, Patient first.
            pub const ALL: &'static [ResourceType] = &[$(ResourceType::$variant,)*];

            /// The FHIR resource type name, e.g. `MedicationRequest`.
            pub fn fhir_name(self) -> &'static str {
                match self {
                    $(ResourceType::$variant => stringify!($variant),)*
                }
            }

            /// The middle of its topic's name: `<prefix>.canonical.<this>.v1`.
            pub fn topic_suffix(self) -> &'static str {
                match self {
                    $(ResourceType::$variant => $topic,)*
                }
            }

            /// The canonical event type, `Canonical<FHIR name>`.
            pub fn event_type(self) -> &'static str {
                match self {
                    $(ResourceType::$variant => concat!("Canonical", stringify!($variant)),)*
                }
            }
        }
    };
}
pub(crate) use resource_types;

/// The type itself is generated in `events.rs`, beside the catalogue of the canonical
/// record events, so that adding a resource type is one change in one file there.
pub use crate::events::ResourceType;

impl ResourceType {
    /// Whether many patients share resources of this type (practitioners, organisations,
    /// locations, medications, devices): they need no patient, their canonical id depends
    /// on their own id only, and their topic is keyed by that id.
    pub fn is_shared(self) -> bool {
        matches!(
            self,
            ResourceType::Practitioner
                | ResourceType::PractitionerRole
                | ResourceType::Organization
                | ResourceType::Location
                | ResourceType::Medication
                | ResourceType::Device
        )
    }

    /// The canonical type a FHIR resource type name names, if any.
    pub fn parse(fhir_name: &str) -> Option<ResourceType> {
        ResourceType::ALL
            .iter()
            .copied()
            .find(|t| t.fhir_name() == fhir_name)
    }
}

/// Compares with a FHIR resource type name.
impl PartialEq<&str> for ResourceType {
    fn eq(&self, other: &&str) -> bool {
        self.fhir_name() == *other
    }
}

/// Serialised as its FHIR name, like the `resourceType` it stands for.
impl serde::Serialize for ResourceType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.fhir_name())
    }
}

impl std::fmt::Display for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.fhir_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_follow_the_fhir_name() {
        for &t in ResourceType::ALL {
            assert_eq!(ResourceType::parse(t.fhir_name()), Some(t));
            assert_eq!(t.topic_suffix(), t.fhir_name().to_lowercase());
            assert_eq!(t.event_type(), format!("Canonical{}", t.fhir_name()));
        }
        assert_eq!(ResourceType::ALL[0], ResourceType::Patient);
        assert_eq!(ResourceType::parse("Specimen"), None);
        let shared: Vec<&str> = ResourceType::ALL
            .iter()
            .filter(|t| t.is_shared())
            .map(|t| t.fhir_name())
            .collect();
        assert_eq!(
            shared,
            [
                "Practitioner",
                "PractitionerRole",
                "Organization",
                "Location",
                "Medication",
                "Device"
            ]
        );
    }
}
