package org.medpipe.fhirvalidator;

import ca.uhn.fhir.validation.SingleValidationMessage;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.util.LinkedHashSet;
import java.util.Set;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Sorts the validator's messages into errors, warnings, information, and terminology that
 * cannot be checked offline.
 *
 * <p>A message is "terminology not checkable offline" only when both hold:
 *
 * <ul>
 *   <li>its message id says the validator could not check a code because it does not have
 *       the code system's content ({@link #UNCHECKABLE}), and
 *   <li>every code system it concerns, read from the coding at the message's location (or,
 *       failing that, named in its text), is an external terminology that the base R4
 *       definitions do not carry ({@link #EXTERNAL_SYSTEMS}).
 * </ul>
 *
 * <p>Anything else keeps the validator's severity: a wrong code in an HL7 code system, a
 * made-up system, a code outside a required value set and an unknown system that is not
 * listed here all stay warnings or errors.
 */
final class Classifier {
  enum Kind {
    ERROR("error"),
    WARNING("warning"),
    INFORMATION("information"),
    OFFLINE_TERMINOLOGY("offline-terminology");

    final String label;

    Kind(String label) {
      this.label = label;
    }
  }

  /** One message, classified; {@code system} is set for offline terminology. */
  record Classified(Kind kind, String severity, String location, String messageId,
      String message, String system) {
    static Classified input(String message) {
      return new Classified(Kind.ERROR, "ERROR", "", "MEDPIPE_NOT_A_RESOURCE", message, null);
    }

    /**
     * What kind of message this is, for counting: its id, or (for the few messages HAPI
     * gives no id) its text up to the first full stop.
     */
    String key() {
      if (!messageId.isEmpty()) {
        return messageId;
      }
      int stop = message.indexOf('.');
      return stop > 0 ? message.substring(0, stop) : message;
    }

    ObjectNode toJson(ObjectMapper json) {
      ObjectNode m = json.createObjectNode();
      m.put("class", kind.label);
      m.put("severity", severity);
      m.put("location", location);
      m.put("messageId", messageId);
      m.put("message", message);
      if (system != null) {
        m.put("system", system);
      }
      return m;
    }
  }

  /**
   * Code systems whose content the offline validator does not have (they are not part of
   * the FHIR R4 definitions): their codes can only be checked against a terminology server.
   */
  static final Set<String> EXTERNAL_SYSTEMS = Set.of(
      "http://loinc.org",
      "http://snomed.info/sct",
      "http://www.nlm.nih.gov/research/umls/rxnorm",
      "http://hl7.org/fhir/sid/cvx",
      "http://hl7.org/fhir/sid/ndc",
      "http://hl7.org/fhir/sid/icd-10",
      "http://hl7.org/fhir/sid/icd-10-cm",
      "http://hl7.org/fhir/sid/icd-9-cm",
      "http://www.ama-assn.org/go/cpt",
      "http://nucc.org/provider-taxonomy",
      // CDC Race & Ethnicity (US Core's race and ethnicity extensions).
      "urn:oid:2.16.840.1.113883.6.238");

  /**
   * Message ids (org.hl7.fhir.utilities.i18n.I18nConstants, as HAPI 8.8.1 reports them) that
   * mean "this code system's content is not available here, so the code was not checked".
   */
  static final Set<String> UNCHECKABLE = Set.of(
      "Terminology_TX_System_Unknown",
      "TERMINOLOGY_TX_SYSTEM_NOTKNOWN",
      "UNKNOWN_CODESYSTEM",
      "UNKNOWN_CODESYSTEM_VERSION",
      "Terminology_PassThrough_TX_Message",
      "TERMINOLOGY_PASSTHROUGH_TX_MESSAGE");

  private static final Pattern URI = Pattern.compile("(https?://[^\\s'\"#|,)\\]]+|urn:[^\\s'\"#|,)\\]]+)");
  private static final Pattern STEP = Pattern.compile("([A-Za-z_][A-Za-z0-9_]*)(?:\\[(\\d+)\\])?");

  Classified classify(SingleValidationMessage m, JsonNode resource) {
    String severity = m.getSeverity() == null ? "ERROR" : m.getSeverity().name();
    String location = m.getLocationString() == null ? "" : m.getLocationString();
    String id = m.getMessageId() == null ? "" : m.getMessageId();
    String text = m.getMessage() == null ? "" : m.getMessage();
    Kind kind = switch (severity) {
      case "FATAL", "ERROR" -> Kind.ERROR;
      case "WARNING" -> Kind.WARNING;
      default -> Kind.INFORMATION;
    };
    String system = null;
    if (UNCHECKABLE.contains(id)) {
      // The text names the one system the message is about; the location may be a
      // CodeableConcept whose other codings are fine.
      Set<String> systems = systemsIn(text);
      if (systems.isEmpty()) {
        systems = systemsAt(resource, location);
      }
      if (!systems.isEmpty() && EXTERNAL_SYSTEMS.containsAll(systems)) {
        kind = Kind.OFFLINE_TERMINOLOGY;
        system = String.join(" ", systems);
      }
    }
    return new Classified(kind, severity, location, id, text, system);
  }

  /**
   * The code systems of the element a message points at: the coding's system, or those of a
   * CodeableConcept's codings. Locations look like {@code Observation.code.coding[0]}.
   */
  static Set<String> systemsAt(JsonNode resource, String location) {
    Set<String> out = new LinkedHashSet<>();
    JsonNode node = resource;
    JsonNode coding = null;
    String[] steps = location.split("\\.");
    for (int i = 1; i < steps.length && node != null; i++) {
      Matcher s = STEP.matcher(steps[i]);
      if (!s.matches()) {
        node = null;
        break;
      }
      node = node.get(s.group(1));
      if (node != null && node.isArray()) {
        node = node.get(s.group(2) == null ? 0 : Integer.parseInt(s.group(2)));
      }
      if (node != null && node.isObject() && node.has("system")) {
        coding = node;
      }
    }
    if (node != null && node.isObject() && node.has("coding")) {
      for (JsonNode c : node.get("coding")) {
        if (c.hasNonNull("system")) {
          out.add(c.get("system").asText());
        }
      }
    } else if (coding != null) {
      out.add(coding.get("system").asText());
    }
    return out;
  }

  /** The code system URIs a message's text names (value set URLs are not code systems). */
  static Set<String> systemsIn(String text) {
    Set<String> out = new LinkedHashSet<>();
    Matcher u = URI.matcher(text);
    while (u.find()) {
      String uri = u.group(1).replaceAll("[.;:]+$", "");
      if (!uri.contains("/ValueSet/")) {
        out.add(uri);
      }
    }
    return out;
  }
}
