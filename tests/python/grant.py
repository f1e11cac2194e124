"""Creates SCRAM users and their ACLs on the dev stack's broker, as a platform team would
with Kafka's Admin API (the Strimzi User Operator does the same for `KafkaUser`s).

Reads a JSON plan on standard input: a list of grants as `pipeline::access::grants`
renders them, each with a `password` added by the caller:
  [{"principal": "p-canonization", "password": "...",
    "acls": [{"kind": "topic", "name": "p.anonymization.v1", "pattern": "literal",
              "operations": ["Read", "Describe"]}, ...]}, ...]

Usage: grant.py --bootstrap HOST:PORT < plan.json
Runs as the broker's super user (the plaintext listener's ANONYMOUS). Exit status 0 only
if every credential and every ACL was created.
"""

import argparse
import json
import sys

from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

KINDS = {
    "topic": ResourceType.TOPIC,
    "group": ResourceType.GROUP,
    "transactional_id": ResourceType.TRANSACTIONAL_ID,
}
PATTERNS = {"literal": ResourcePatternType.LITERAL, "prefixed": ResourcePatternType.PREFIXED}
OPERATIONS = {"Read": AclOperation.READ, "Write": AclOperation.WRITE, "Describe": AclOperation.DESCRIBE}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    args = ap.parse_args()
    plan = json.load(sys.stdin)
    admin = AdminClient({"bootstrap.servers": args.bootstrap})

    upserts = [
        UserScramCredentialUpsertion(
            g["principal"],
            ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096),
            g["password"].encode(),
        )
        for g in plan
    ]
    for user, future in admin.alter_user_scram_credentials(upserts).items():
        future.result(timeout=30)
        print(f"credential: {user}")

    bindings = [
        AclBinding(
            KINDS[a["kind"]],
            a["name"],
            PATTERNS[a["pattern"]],
            f"User:{g['principal']}",
            "*",
            OPERATIONS[op],
            AclPermissionType.ALLOW,
        )
        for g in plan
        for a in g["acls"]
        for op in a["operations"]
    ]
    for binding, future in admin.create_acls(bindings).items():
        future.result(timeout=30)
    print(f"acls: {len(bindings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
