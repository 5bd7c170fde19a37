"""UpdateSecret and UpdateConfig over a real grpc.aio server on a LocalStore: labels only, as Docker
allows (`docker stack deploy` posts a secret's or config's spec back on every redeploy)."""

from __future__ import annotations

import grpc
from helpers.aio import run
from helpers.controlapi import served
from test_controlapi import expect

from shoal.proto import control_pb2, specs_pb2, types_pb2

C = grpc.StatusCode


def test_update_secret_and_config_labels_only(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            sec = (await s.stub.CreateSecret(control_pb2.CreateSecretRequest(spec=specs_pb2.SecretSpec(
                annotations=types_pb2.Annotations(name="s1", labels={"a": "1"}), data=b"pw")))).secret
            cfg = (await s.stub.CreateConfig(control_pb2.CreateConfigRequest(spec=specs_pb2.ConfigSpec(
                annotations=types_pb2.Annotations(name="c1"), data=b"conf")))).config

            # The same spec posted back (with its data, as stack deploy sends it): nothing written.
            v = s.store.sm.version
            same = specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name="s1", labels={"a": "1"}), data=b"pw")
            got = (await s.stub.UpdateSecret(control_pb2.UpdateSecretRequest(
                secret_id=sec.id, secret_version=sec.meta.version, spec=same))).secret
            assert s.store.sm.version == v and got.meta.version == sec.meta.version and got.spec.data == b""

            # New labels, by name and without data: written; the data stays.
            got = (await s.stub.UpdateSecret(control_pb2.UpdateSecretRequest(
                secret_id="s1", secret_version=sec.meta.version, spec=specs_pb2.SecretSpec(
                    annotations=types_pb2.Annotations(name="s1", labels={"b": "2"}))))).secret
            assert dict(got.spec.annotations.labels) == {"b": "2"} and got.meta.version > sec.meta.version
            assert s.store.get("secret", sec.id).spec.data == b"pw"

            # A stale version, a new name, new data: refused, nothing written.
            v = s.store.sm.version
            await expect(C.ABORTED, s.stub.UpdateSecret(control_pb2.UpdateSecretRequest(
                secret_id=sec.id, secret_version=sec.meta.version, spec=same)), "update out of sequence")
            await expect(C.INVALID_ARGUMENT, s.stub.UpdateSecret(control_pb2.UpdateSecretRequest(
                secret_id=sec.id, spec=specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name="s2")))),
                "only updates to Labels are allowed")
            await expect(C.INVALID_ARGUMENT, s.stub.UpdateSecret(control_pb2.UpdateSecretRequest(
                secret_id=sec.id, spec=specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name="s1"),
                                                            data=b"other"))), "data of secret s1 cannot change")
            await expect(C.NOT_FOUND, s.stub.UpdateSecret(control_pb2.UpdateSecretRequest(
                secret_id="nosuch", spec=same)))
            assert s.store.sm.version == v

            got = (await s.stub.UpdateConfig(control_pb2.UpdateConfigRequest(
                config_id=cfg.id, config_version=cfg.meta.version, spec=specs_pb2.ConfigSpec(
                    annotations=types_pb2.Annotations(name="c1", labels={"k": "v"}), data=b"conf")))).config
            assert dict(got.spec.annotations.labels) == {"k": "v"} and got.spec.data == b"conf"
            await expect(C.INVALID_ARGUMENT, s.stub.UpdateConfig(control_pb2.UpdateConfigRequest(
                config_id="c1", spec=specs_pb2.ConfigSpec(annotations=types_pb2.Annotations(name="c1"),
                                                          data=b"new"))), "data of config c1 cannot change")

    run(main())
