"""Reads every record of every canonical topic with the standard Confluent Python client.

This is what an analytics team would write: confluent-kafka's Consumer (read_committed),
its SchemaRegistryClient and its AvroDeserializer, with nothing medpipe-specific. It
decodes each message, checks the envelope and the canonical fields, and prints a JSON
summary (counts per topic and the resource ids) for the calling test to compare.

Usage: read_canonical.py --bootstrap HOST:PORT --registry URL --topics T1,T2,... --expect N1,N2,...
Exit status 0 only if every topic holds exactly the expected number of records and each
one decodes to a valid canonical record.
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--registry", required=True)
    ap.add_argument("--topics", required=True)
    ap.add_argument("--expect", required=True)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    topics = args.topics.split(",")
    expect = dict(zip(topics, (int(n) for n in args.expect.split(","))))

    registry = SchemaRegistryClient({"url": args.registry})
    deserialize = AvroDeserializer(registry)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"python-reader-{time.time_ns()}",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    # Where each partition ends now; read until every position reaches it.
    ends = {}
    for t in topics:
        md = consumer.list_topics(t, timeout=10).topics[t]
        for p in md.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)
            if high > 0:
                ends[(t, p)] = high
    consumer.assign([TopicPartition(t, p, 0) for (t, p) in ends])

    counts = {t: 0 for t in topics}
    ids = {t: [] for t in topics}
    problems = []
    deadline = time.time() + args.timeout
    last_message = time.time()
    while ends and time.time() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            last_message = time.time()
            ctx = SerializationContext(msg.topic(), MessageField.VALUE)
            event = deserialize(msg.value(), ctx)
            payload = event["payload"]
            where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
            for field in ("event_id", "event_type", "correlation_id", "source_service"):
                if not event.get(field):
                    problems.append(f"{where}: envelope field {field} is empty")
            # Patient records are keyed by patient pseudonym; shared resources (practitioners,
            # organisations, ...) have none and are keyed by their own id.
            key = payload.get("patient_pseudonym", payload["resource_id"])
            if msg.key().decode() != key:
                problems.append(f"{where}: key is not the patient pseudonym or shared id")
            fhir = json.loads(payload["fhir_json"])
            if fhir.get("id") != payload["resource_id"]:
                problems.append(f"{where}: fhir_json id differs from resource_id")
            counts[msg.topic()] += 1
            ids[msg.topic()].append(payload["resource_id"])
        # A transaction's commit marker takes the last offset, so once input has been
        # idle for a while a position one short of the end is the end.
        slack = 1 if time.time() - last_message > 3 else 0
        for tp in consumer.position([TopicPartition(t, p) for (t, p) in list(ends)]):
            if tp.offset >= 0 and tp.offset + slack >= ends[(tp.topic, tp.partition)]:
                del ends[(tp.topic, tp.partition)]
    consumer.close()
    if ends:
        problems.append(f"did not reach the end of {sorted(ends)} in time")
    for t in topics:
        if counts[t] != expect[t]:
            problems.append(f"{t}: {counts[t]} records, expected {expect[t]}")
    print(json.dumps({"counts": counts, "ids": ids, "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
