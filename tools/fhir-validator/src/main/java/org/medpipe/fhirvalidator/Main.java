package org.medpipe.fhirvalidator;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import com.fasterxml.jackson.core.JsonGenerator;
import com.fasterxml.jackson.core.JsonParser;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.MappingIterator;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.SerializationFeature;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.io.OutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.stream.Stream;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import org.hl7.fhir.r5.utils.validation.constants.BestPracticeWarningLevel;

/**
 * Validates FHIR R4 resources with HAPI FHIR's instance validator, offline: the base R4
 * definitions (hapi-fhir-validation-resources-r4) and the terminology HAPI can check
 * in memory. One JVM validates every resource given, since HAPI takes seconds to start.
 *
 * <p>Usage: {@code fhir-validator [--report FILE] [--list N] PATH...}. A PATH is a file or a
 * directory (searched for {@code *.json} and {@code *.ndjson}); a file holds one resource, a
 * JSON array of resources, or NDJSON. A golden mapping output ({@code {"resources": [{"resource":
 * ...}]}}) is read as its resources. The JSON report goes to FILE (default stdout), a summary to
 * stderr. Exit 0 when no error remains after classification (see {@link Classifier}), 1 when one
 * does, 2 when the input cannot be read.
 */
public final class Main {
  private static final ObjectMapper JSON = new ObjectMapper()
      .enable(SerializationFeature.INDENT_OUTPUT)
      .disable(JsonParser.Feature.AUTO_CLOSE_SOURCE)
      .disable(JsonGenerator.Feature.AUTO_CLOSE_TARGET);

  private Main() {}

  /** One resource to validate, and where it came from. */
  record Item(Path file, int index, JsonNode resource) {}

  public static void main(String[] args) {
    // Before any logger exists: HAPI's warnings, not its progress; and not the lenient
    // parser's notes on the bundled definitions.
    System.setProperty("org.slf4j.simpleLogger.defaultLogLevel",
        System.getProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn"));
    System.setProperty("org.slf4j.simpleLogger.log.ca.uhn.fhir.parser.LenientErrorHandler",
        "error");
    int code;
    try {
      code = run(args);
    } catch (UsageException e) {
      System.err.println("fhir-validator: " + e.getMessage());
      code = 2;
    } catch (IOException e) {
      System.err.println("fhir-validator: " + e);
      e.printStackTrace();
      code = 2;
    }
    System.exit(code);
  }

  static final class UsageException extends Exception {
    UsageException(String message) {
      super(message);
    }
  }

  static int run(String[] args) throws IOException, UsageException {
    Path report = null;
    int listed = 50;
    boolean bestPractice = false;
    List<Path> paths = new ArrayList<>();
    for (int i = 0; i < args.length; i++) {
      switch (args[i]) {
        case "--report" -> {
          if (++i >= args.length) {
            throw new UsageException("--report needs a file");
          }
          report = Path.of(args[i]);
        }
        case "--list" -> {
          if (++i >= args.length) {
            throw new UsageException("--list needs a number");
          }
          listed = Integer.parseInt(args[i]);
        }
        case "--best-practice" -> bestPractice = true;
        case "-h", "--help" -> {
          System.err.println(
              "usage: fhir-validator [--report FILE] [--list N] [--best-practice] PATH...");
          return 0;
        }
        default -> paths.add(Path.of(args[i]));
      }
    }
    if (paths.isEmpty()) {
      throw new UsageException("no input: give files or directories of FHIR JSON");
    }

    List<Path> files = new ArrayList<>();
    for (Path p : paths) {
      files.addAll(files(p));
    }
    List<Item> items = new ArrayList<>();
    for (Path f : files) {
      items.addAll(read(f));
    }
    if (items.isEmpty()) {
      throw new UsageException("no resources found in " + paths);
    }

    long started = System.nanoTime();
    FhirValidator validator = validator(bestPractice);
    long ready = System.nanoTime();
    Classifier classifier = new Classifier();
    Summary summary = new Summary();
    ArrayNode results = JSON.createArrayNode();
    for (Item item : items) {
      results.add(validate(validator, classifier, item, summary));
    }
    long done = System.nanoTime();

    ObjectNode out = JSON.createObjectNode();
    ObjectNode about = out.putObject("validator");
    about.put("engine", "HAPI FHIR FhirInstanceValidator");
    about.put("hapiVersion", ca.uhn.fhir.util.VersionUtil.getVersion());
    about.put("fhirVersion", "4.0.1");
    about.put("terminology", "offline: base R4 code systems and value sets only");
    about.put("startupSeconds", (ready - started) / 1e9);
    about.put("validationSeconds", (done - ready) / 1e9);
    out.set("summary", summary.toJson(files.size()));
    out.set("resources", results);
    if (report == null) {
      write(out, System.out);
    } else {
      Path parent = report.toAbsolutePath().getParent();
      if (parent != null) {
        Files.createDirectories(parent);
      }
      try (OutputStream os = Files.newOutputStream(report)) {
        write(out, os);
      }
    }
    summary.print(System.err, files.size(), results, listed, (ready - started) / 1e9,
        (done - ready) / 1e9);
    return summary.errors > 0 ? 1 : 0;
  }

  private static void write(JsonNode node, OutputStream os) throws IOException {
    JSON.writeValue(os, node);
    os.write('\n');
    os.flush();
  }

  /**
   * The validator: base R4 profiles, snapshots, in-memory terminology; nothing remote.
   * Best-practice recommendations (dom-6 "should have narrative", "observations should have
   * a performer") are off unless asked for: canonization drops narrative on purpose, and they
   * would bury the warnings that matter.
   */
  static FhirValidator validator(boolean bestPractice) {
    FhirContext ctx = FhirContext.forR4Cached();
    ValidationSupportChain chain = new ValidationSupportChain(
        new DefaultProfileValidationSupport(ctx),
        new CommonCodeSystemsTerminologyService(ctx),
        new InMemoryTerminologyServerValidationSupport(ctx),
        new SnapshotGeneratingValidationSupport(ctx));
    FhirInstanceValidator module = new FhirInstanceValidator(chain);
    // Canonical references (Patient/<uuid>) point at resources published beside this one,
    // which the validator cannot fetch: their targets are not checked.
    module.setAssumeValidRestReferences(true);
    module.setBestPracticeWarningLevel(
        bestPractice ? BestPracticeWarningLevel.Warning : BestPracticeWarningLevel.Ignore);
    FhirValidator validator = ctx.newValidator();
    validator.registerValidatorModule(module);
    // HAPI loads the R4 definitions on first use: do it here, so the timings say what
    // startup costs and what each resource costs.
    validator.validateWithResult("{\"resourceType\": \"Patient\"}");
    return validator;
  }

  static ObjectNode validate(FhirValidator validator, Classifier classifier, Item item,
      Summary summary) throws IOException {
    JsonNode resource = item.resource();
    String type = resource.path("resourceType").asText("");
    String id = resource.path("id").asText("");
    ObjectNode result = JSON.createObjectNode();
    result.put("file", item.file().toString());
    result.put("index", item.index());
    result.put("resourceType", type);
    result.put("id", id);
    ArrayNode messages = result.putArray("messages");
    List<Classifier.Classified> found = new ArrayList<>();
    if (!resource.isObject() || type.isEmpty()) {
      found.add(Classifier.Classified.input("the item is not a FHIR resource (no resourceType)"));
    } else {
      ValidationResult vr = validator.validateWithResult(JSON.writeValueAsString(resource));
      for (SingleValidationMessage m : vr.getMessages()) {
        found.add(classifier.classify(m, resource));
      }
    }
    for (Classifier.Classified c : found) {
      messages.add(c.toJson(JSON));
      summary.count(c);
    }
    summary.resource(type, found);
    return result;
  }

  /** The files of a path: itself, or the *.json and *.ndjson files below it, sorted. */
  static List<Path> files(Path p) throws IOException {
    if (!Files.exists(p)) {
      throw new IOException(p + ": no such file or directory");
    }
    if (!Files.isDirectory(p)) {
      return List.of(p);
    }
    try (Stream<Path> walk = Files.walk(p)) {
      return walk.filter(Files::isRegularFile)
          .filter(f -> {
            String n = f.getFileName().toString();
            return n.endsWith(".json") || n.endsWith(".ndjson");
          })
          .sorted()
          .toList();
    }
  }

  /**
   * The resources in a file: every top-level JSON value (so one resource, NDJSON and
   * concatenated JSON all work), arrays flattened, golden mapping outputs unwrapped.
   */
  static List<Item> read(Path file) throws IOException {
    List<Item> items = new ArrayList<>();
    String text = Files.readString(file, StandardCharsets.UTF_8);
    try (MappingIterator<JsonNode> values = JSON.readerFor(JsonNode.class).readValues(text)) {
      while (values.hasNextValue()) {
        collect(file, values.nextValue(), items);
      }
    } catch (RuntimeException | IOException e) {
      throw new IOException(file + ": not JSON, a JSON array or NDJSON: " + e.getMessage(), e);
    }
    return items;
  }

  private static void collect(Path file, JsonNode value, List<Item> items) {
    if (value.isArray()) {
      for (JsonNode v : value) {
        collect(file, v, items);
      }
    } else if (value.isObject() && !value.has("resourceType") && value.has("resources")) {
      for (JsonNode r : value.get("resources")) {
        collect(file, r.has("resource") ? r.get("resource") : r, items);
      }
    } else if (value.isObject() && !value.has("resourceType") && value.has("error")) {
      // A golden output of a record that is dead-lettered: no resource to validate.
    } else {
      items.add(new Item(file, items.size(), value));
    }
  }

  /** Counts over all resources. */
  static final class Summary {
    int resources;
    int resourcesWithErrors;
    int errors;
    int warnings;
    int information;
    int offline;
    final Map<String, Integer> byType = new TreeMap<>();
    final Map<String, Integer> errorKinds = new TreeMap<>();
    final Map<String, Integer> warningKinds = new TreeMap<>();
    final Map<String, Integer> offlineSystems = new TreeMap<>();

    void count(Classifier.Classified c) {
      switch (c.kind()) {
        case ERROR -> {
          errors++;
          errorKinds.merge(c.key(), 1, Integer::sum);
        }
        case WARNING -> {
          warnings++;
          warningKinds.merge(c.key(), 1, Integer::sum);
        }
        case INFORMATION -> information++;
        case OFFLINE_TERMINOLOGY -> {
          offline++;
          offlineSystems.merge(c.system(), 1, Integer::sum);
        }
        default -> throw new IllegalStateException();
      }
    }

    void resource(String type, List<Classifier.Classified> found) {
      resources++;
      byType.merge(type.isEmpty() ? "(none)" : type, 1, Integer::sum);
      if (found.stream().anyMatch(c -> c.kind() == Classifier.Kind.ERROR)) {
        resourcesWithErrors++;
      }
    }

    ObjectNode toJson(int files) {
      ObjectNode s = JSON.createObjectNode();
      s.put("files", files);
      s.put("resources", resources);
      s.put("resourcesWithErrors", resourcesWithErrors);
      s.put("errors", errors);
      s.put("warnings", warnings);
      s.put("information", information);
      s.put("offlineTerminology", offline);
      s.set("resourcesByType", JSON.valueToTree(byType));
      s.set("errorsByKind", JSON.valueToTree(errorKinds));
      s.set("warningsByKind", JSON.valueToTree(warningKinds));
      s.set("offlineTerminologyBySystem", JSON.valueToTree(offlineSystems));
      return s;
    }

    void print(PrintStream err, int files, ArrayNode results, int listed, double startup,
        double validation) {
      err.printf("FHIR validation (HAPI %s, R4, offline): %d resources from %d files in %.1f s"
              + " (startup %.1f s)%n", ca.uhn.fhir.util.VersionUtil.getVersion(), resources,
          files, startup + validation, startup);
      err.printf("  errors: %d (in %d resources)%n", errors, resourcesWithErrors);
      err.printf("  warnings: %d%n", warnings);
      warningKinds.forEach((k, n) -> err.printf("    %5d  %s%n", n, k));
      err.printf("  terminology not checkable offline (not failed): %d%n", offline);
      offlineSystems.forEach((k, n) -> err.printf("    %5d  %s%n", n, k));
      err.printf("  information: %d%n", information);
      for (Classifier.Kind kind : List.of(Classifier.Kind.ERROR, Classifier.Kind.WARNING)) {
        int shown = 0;
        for (JsonNode r : results) {
          for (JsonNode m : r.get("messages")) {
            if (!m.get("class").asText().equals(kind.label)) {
              continue;
            }
            if (shown++ < listed) {
              err.printf("  %s %s/%s (%s #%d) at %s: %s [%s]%n", kind.label.toUpperCase(),
                  r.get("resourceType").asText(), r.get("id").asText(), r.get("file").asText(),
                  r.get("index").asInt(), m.path("location").asText(), m.get("message").asText(),
                  m.path("messageId").asText());
            }
          }
        }
        if (shown > listed) {
          err.printf("  ... and %d more %s messages (see the JSON report)%n", shown - listed,
              kind.label);
        }
      }
      err.println(errors > 0 ? "FAILED: errors remain" : "OK: no errors");
    }
  }
}
