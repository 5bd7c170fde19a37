"""The control API over a real grpc.aio server (unix socket) and client, on a LocalStore."""

from __future__ import annotations

import grpc
import pytest
from helpers.aio import run
from helpers.controlapi import served
from helpers.pki import ca_cert_pem, identity

from shoal.manager.store import Tx
from shoal.proto import control_pb2, control_pb2_grpc, objects_pb2, specs_pb2, types_pb2

C = grpc.StatusCode


def svc_spec(name: str = "web", image: str = "busybox:latest", replicas: int = 1, **kw) -> specs_pb2.ServiceSpec:
    spec = specs_pb2.ServiceSpec(
        annotations=types_pb2.Annotations(name=name, labels=kw.pop("labels", {})),
        task=types_pb2.TaskSpec(container=types_pb2.ContainerSpec(image=image)),
        replicated=specs_pb2.ReplicatedService(replicas=replicas),
    )
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


async def expect(code: grpc.StatusCode, call, match: str = ""):
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    assert ei.value.code() == code, ei.value.details()
    assert match.lower() in ei.value.details().lower(), ei.value.details()
    return ei.value.details()


def test_service_create_get_list_update_rollback_remove(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            created = (await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=svc_spec()))).service
            assert len(created.id) == 25 and created.spec_version == 1 and created.meta.version > 0
            assert not created.HasField("previous_spec")
            got = (await s.stub.GetService(control_pb2.GetServiceRequest(service_id="web"))).service
            assert got == created
            got = (await s.stub.GetService(control_pb2.GetServiceRequest(service_id=created.id[:5]))).service
            assert got.id == created.id

            await expect(C.ALREADY_EXISTS, s.stub.CreateService(control_pb2.CreateServiceRequest(spec=svc_spec())),
                         "already in use")

            new = svc_spec(replicas=3)
            upd = (await s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id="web", service_version=got.meta.version, spec=new))).service
            assert upd.spec.replicated.replicas == 3 and upd.spec_version == 2
            assert upd.previous_spec.replicated.replicas == 1 and upd.previous_spec_version == 1

            # A stale version is a conflict, and nothing changes.
            await expect(C.ABORTED, s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id="web", service_version=got.meta.version, spec=svc_spec(replicas=5))), "out of sequence")
            assert s.store.get("service", created.id).spec.replicated.replicas == 3

            # The same spec again writes nothing.
            v = s.store.sm.version
            same = (await s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id=created.id, service_version=upd.meta.version, spec=upd.spec))).service
            assert same == upd and s.store.sm.version == v

            rb = (await s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id="web", service_version=upd.meta.version,
                rollback=control_pb2.UpdateServiceRequest.PREVIOUS))).service
            assert rb.spec.replicated.replicas == 1 and rb.spec_version == 1
            assert rb.previous_spec.replicated.replicas == 3 and rb.previous_spec_version == 2
            assert rb.update_status.state == types_pb2.UpdateStatus.ROLLBACK_STARTED

            # A later update gets a spec version above every earlier one.
            again = (await s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id="web", service_version=rb.meta.version, spec=svc_spec(replicas=4)))).service
            assert again.spec_version == 3 and again.previous_spec_version == 1

            await expect(C.INVALID_ARGUMENT, s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id="web", service_version=again.meta.version, spec=svc_spec(name="other"))), "renam")
            g = svc_spec()
            getattr(g, "global").SetInParent()
            await expect(C.INVALID_ARGUMENT, s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id="web", service_version=again.meta.version, spec=g)), "mode")

            listed = (await s.stub.ListServices(control_pb2.ListServicesRequest())).services
            assert [x.spec.annotations.name for x in listed] == ["web"]

            # Removing marks the tasks REMOVE in the same transaction.
            task = objects_pb2.Task(service_id=created.id, desired_state=types_pb2.RUNNING, slot=1)
            task = await s.store.update(lambda tx: tx.create(task))
            await s.stub.RemoveService(control_pb2.RemoveServiceRequest(service_id="web"))
            assert s.store.get("service", created.id) is None
            assert s.store.get("task", task.id).desired_state == types_pb2.REMOVE
            await expect(C.NOT_FOUND, s.stub.GetService(control_pb2.GetServiceRequest(service_id="web")), "not found")
            await expect(C.NOT_FOUND, s.stub.RemoveService(control_pb2.RemoveServiceRequest(service_id="web")))

    run(main())


def test_service_defaults_name_and_mode(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            spec = specs_pb2.ServiceSpec(task=types_pb2.TaskSpec(container=types_pb2.ContainerSpec(image="busybox")))
            svc = (await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=spec))).service
            assert svc.spec.annotations.name and svc.spec.replicated.replicas == 1
            await expect(C.FAILED_PRECONDITION, s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id=svc.id, service_version=svc.meta.version,
                rollback=control_pb2.UpdateServiceRequest.PREVIOUS)), "no previous spec")

    run(main())


def test_service_references_resolve_to_ids(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            net = (await s.stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=specs_pb2.NetworkSpec(
                annotations=types_pb2.Annotations(name="net1"))))).network
            assert net.driver_state.vni and net.ipam.configs[0].subnet and net.spec.driver_config.name == "overlay"
            sec = (await s.stub.CreateSecret(control_pb2.CreateSecretRequest(spec=specs_pb2.SecretSpec(
                annotations=types_pb2.Annotations(name="s1"), data=b"pw")))).secret
            assert sec.spec.data == b""
            cfg = (await s.stub.CreateConfig(control_pb2.CreateConfigRequest(spec=specs_pb2.ConfigSpec(
                annotations=types_pb2.Annotations(name="c1"), data=b"conf")))).config
            assert cfg.spec.data == b"conf"

            spec = svc_spec()
            spec.task.networks.add(target="net1")
            spec.task.container.secrets.add(secret_name="s1")
            spec.task.container.configs.add(config_id=cfg.id[:6], file=types_pb2.FileTarget(name="/etc/c.conf"))
            svc = (await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=spec))).service
            assert svc.spec.task.networks[0].target == net.id
            ref = svc.spec.task.container.secrets[0]
            assert (ref.secret_id, ref.secret_name, ref.file.name, ref.file.mode) == (sec.id, "s1", "s1", 0o444)
            cref = svc.spec.task.container.configs[0]
            assert (cref.config_id, cref.config_name, cref.file.name) == (cfg.id, "c1", "/etc/c.conf")

            # Posting back the stored spec (ids now) is no change.
            v = s.store.sm.version
            await s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id=svc.id, service_version=svc.meta.version, spec=svc.spec))
            assert s.store.sm.version == v

            # In use: nothing is removed.
            await expect(C.FAILED_PRECONDITION, s.stub.RemoveNetwork(control_pb2.RemoveNetworkRequest(
                network_id="net1")), "in use by service 'web'")
            await expect(C.FAILED_PRECONDITION, s.stub.RemoveSecret(control_pb2.RemoveSecretRequest(
                secret_id="s1")), "in use by service web")
            await expect(C.FAILED_PRECONDITION, s.stub.RemoveConfig(control_pb2.RemoveConfigRequest(
                config_id="c1")), "in use by service web")
            assert s.store.sm.version == v

            await s.stub.RemoveService(control_pb2.RemoveServiceRequest(service_id="web"))
            await s.stub.RemoveSecret(control_pb2.RemoveSecretRequest(secret_id="s1"))
            await s.stub.RemoveConfig(control_pb2.RemoveConfigRequest(config_id=cfg.id))
            await s.stub.RemoveNetwork(control_pb2.RemoveNetworkRequest(network_id=net.id[:8]))
            for kind in ("secret", "config", "network"):
                assert s.store.find(kind) == []

    run(main())


def test_network_in_use_by_running_task(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            net = (await s.stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=specs_pb2.NetworkSpec(
                annotations=types_pb2.Annotations(name="att"), attachable=True)))).network
            task = objects_pb2.Task(desired_state=types_pb2.RUNNING,
                                    status=types_pb2.TaskStatus(state=types_pb2.RUNNING))
            task.networks.add().network.CopyFrom(net)
            task = await s.store.update(lambda tx: tx.create(task))
            await expect(C.FAILED_PRECONDITION, s.stub.RemoveNetwork(control_pb2.RemoveNetworkRequest(
                network_id="att")), f"in use by task {task.id}")
            done = objects_pb2.Task()
            done.CopyFrom(s.store.get("task", task.id))
            done.status.state = types_pb2.COMPLETE
            await s.store.update(lambda tx: tx.update(done))
            await s.stub.RemoveNetwork(control_pb2.RemoveNetworkRequest(network_id="att"))

    run(main())


def test_published_port_taken_by_other_service(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            a = svc_spec("a")
            a.endpoint.ports.add(target_port=80, published_port=8080)
            await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=a))
            b = svc_spec("b")
            b.endpoint.ports.add(target_port=81, published_port=8080)
            v = s.store.sm.version
            await expect(C.INVALID_ARGUMENT, s.stub.CreateService(control_pb2.CreateServiceRequest(spec=b)),
                         "published port 8080/tcp is already used by service 'a'")
            assert s.store.sm.version == v
            b.endpoint.ports[0].protocol = types_pb2.PortConfig.UDP
            await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=b))
            # The service itself may keep its port across an update.
            cur = s.store.resolve("service", "a")
            a.task.container.env.append("X=1")
            await s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id="a", service_version=cur.meta.version, spec=a))

    run(main())


def test_network_validation_in_store(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            spec = specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name="n1"))
            spec.ipam.configs.add(subnet="10.9.0.0/24")
            await s.stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=spec))
            spec.annotations.name = "n2"
            spec.ipam.configs[0].subnet = "10.9.0.0/16"
            await expect(C.INVALID_ARGUMENT, s.stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=spec)),
                         "overlaps")
            ing = specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name="ingress"), ingress=True)
            await s.stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=ing))
            ing.annotations.name = "ingress2"
            await expect(C.ALREADY_EXISTS, s.stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=ing)),
                         "ingress network already exists")
            sp = svc_spec()
            sp.task.networks.add(target="ingress")
            await expect(C.INVALID_ARGUMENT, s.stub.CreateService(control_pb2.CreateServiceRequest(spec=sp)),
                         "ingress")
            sp = svc_spec()
            sp.endpoint.ports.add(target_port=80, published_port=8080)
            await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=sp))
            await expect(C.FAILED_PRECONDITION, s.stub.RemoveNetwork(control_pb2.RemoveNetworkRequest(
                network_id="ingress")), "in use by service 'web'")
            assert [n.spec.annotations.name for n in s.store.find("network")].count("n2") == 0

    run(main())


def make_node(hostname: str, role: int = types_pb2.WORKER, state: int = types_pb2.NodeStatus.READY,
              **labels: str) -> objects_pb2.Node:
    n = objects_pb2.Node(role=role, description=types_pb2.NodeDescription(hostname=hostname),
                         status=types_pb2.NodeStatus(state=state))
    n.spec.desired_role = role
    n.spec.membership = specs_pb2.NodeSpec.ACCEPTED
    n.spec.annotations.labels.update(labels)
    if role == types_pb2.MANAGER:
        n.manager_status.reachability = types_pb2.ManagerStatus.REACHABLE
        n.manager_status.addr = f"{hostname}:2377"
    return n


def test_nodes_update_promote_demote_remove(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            m1 = await s.store.update(lambda tx: tx.create(make_node("m1", types_pb2.MANAGER)))
            w1 = await s.store.update(lambda tx: tx.create(make_node("w1", zone="a")))
            w2 = await s.store.update(lambda tx: tx.create(make_node("w2", state=types_pb2.NodeStatus.DOWN)))
            nodes = (await s.stub.ListNodes(control_pb2.ListNodesRequest())).nodes
            assert [n.description.hostname for n in nodes] == ["m1", "w1", "w2"]
            f = control_pb2.ListFilters(roles=[types_pb2.MANAGER])
            assert [n.id for n in (await s.stub.ListNodes(control_pb2.ListNodesRequest(filters=f))).nodes] == [m1.id]
            f = control_pb2.ListFilters(labels={"zone": "a"})
            assert [n.id for n in (await s.stub.ListNodes(control_pb2.ListNodesRequest(filters=f))).nodes] == [w1.id]
            assert (await s.stub.GetNode(control_pb2.GetNodeRequest(node_id="w1"))).node.id == w1.id

            cur = s.store.get("node", w1.id)
            spec = specs_pb2.NodeSpec()
            spec.CopyFrom(cur.spec)
            spec.availability = types_pb2.DRAIN
            node = (await s.stub.UpdateNode(control_pb2.UpdateNodeRequest(
                node_id="w1", node_version=cur.meta.version, spec=spec))).node
            assert node.spec.availability == types_pb2.DRAIN
            # a version from before that spec change is stale ...
            await expect(C.ABORTED, s.stub.UpdateNode(control_pb2.UpdateNodeRequest(
                node_id="w1", node_version=cur.meta.version, spec=spec)), "out of sequence")
            # ... one read after it is not, though the node's description was written since: the
            # request replaces only the spec, and it saw the current one
            read = s.store.get("node", w1.id)

            def described(tx: Tx) -> None:
                n = objects_pb2.Node()
                n.CopyFrom(tx.get("node", w1.id))
                n.description.engine.engine_version = "next"
                tx.update(n)

            await s.store.update(described)
            assert s.store.get("node", w1.id).meta.version > read.meta.version
            spec.annotations.labels["rack"] = "r1"
            node = (await s.stub.UpdateNode(control_pb2.UpdateNodeRequest(
                node_id="w1", node_version=read.meta.version, spec=spec))).node
            assert node.spec.annotations.labels["rack"] == "r1" and node.description.engine.engine_version == "next"
            # and a version from the future is no version of this node
            await expect(C.ABORTED, s.stub.UpdateNode(control_pb2.UpdateNodeRequest(
                node_id="w1", node_version=node.meta.version + 1000, spec=spec)), "out of sequence")
            del spec.annotations.labels["rack"]

            # The last manager cannot be demoted.
            mspec = specs_pb2.NodeSpec()
            mspec.CopyFrom(m1.spec)
            mspec.desired_role = types_pb2.WORKER
            await expect(C.FAILED_PRECONDITION, s.stub.UpdateNode(control_pb2.UpdateNodeRequest(
                node_id="m1", spec=mspec)), "last manager")
            # Promote w1, then demoting m1 is allowed (2 managers, 1 remains reachable).
            spec.desired_role = types_pb2.MANAGER
            await s.stub.UpdateNode(control_pb2.UpdateNodeRequest(node_id="w1", spec=spec))
            assert s.store.get("node", w1.id).spec.desired_role == types_pb2.MANAGER
            # A manager can't be removed, a READY node not without force, a DOWN node can.
            await expect(C.FAILED_PRECONDITION, s.stub.RemoveNode(control_pb2.RemoveNodeRequest(node_id="w1")),
                         "demote it first")
            spec.desired_role = types_pb2.WORKER
            await s.stub.UpdateNode(control_pb2.UpdateNodeRequest(node_id="w1", spec=spec))
            await expect(C.FAILED_PRECONDITION, s.stub.RemoveNode(control_pb2.RemoveNodeRequest(node_id="w1")),
                         "not down")
            await s.stub.RemoveNode(control_pb2.RemoveNodeRequest(node_id="w1", force=True))
            await s.stub.RemoveNode(control_pb2.RemoveNodeRequest(node_id=w2.id))
            assert [n.id for n in s.store.find("node")] == [m1.id]

    run(main())


def test_demote_refused_without_quorum(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            ms = []
            for i in range(3):
                ms.append(await s.store.update(lambda tx, i=i: tx.create(make_node(f"m{i}", types_pb2.MANAGER))))
            down = objects_pb2.Node()
            down.CopyFrom(s.store.get("node", ms[2].id))
            down.manager_status.reachability = types_pb2.ManagerStatus.UNREACHABLE
            await s.store.update(lambda tx: tx.update(down))
            spec = specs_pb2.NodeSpec()
            spec.CopyFrom(ms[0].spec)
            spec.desired_role = types_pb2.WORKER
            # 3 managers, one unreachable: demoting a reachable one leaves 1 of 2 reachable.
            await expect(C.FAILED_PRECONDITION, s.stub.UpdateNode(control_pb2.UpdateNodeRequest(
                node_id="m0", spec=spec)), "quorum")
            # Demoting the unreachable one leaves 2 of 2.
            await s.stub.UpdateNode(control_pb2.UpdateNodeRequest(node_id="m2", spec=spec))

    run(main())


def test_task_filters(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            a = (await s.stub.CreateService(control_pb2.CreateServiceRequest(
                spec=svc_spec("a", labels={"stack": "st"})))).service
            b = (await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=svc_spec("b")))).service
            n1 = await s.store.update(lambda tx: tx.create(make_node("n1")))

            def mk(svc, slot, node="", desired=types_pb2.RUNNING):
                t = objects_pb2.Task(service_id=svc.id, slot=slot, node_id=node, desired_state=desired)
                t.service_annotations.CopyFrom(svc.spec.annotations)
                t.annotations.name = f"{svc.spec.annotations.name}.{slot}"
                return t

            ts = [mk(a, 1, n1.id), mk(a, 2), mk(a, 1, n1.id, types_pb2.SHUTDOWN), mk(b, 1, n1.id)]
            await s.store.update(lambda tx: [tx.create(t) for t in ts])

            async def ids(**kw):
                r = await s.stub.ListTasks(control_pb2.ListTasksRequest(filters=control_pb2.ListFilters(**kw)))
                return sorted(t.id for t in r.tasks)

            assert len(await ids()) == 4
            assert await ids(service_ids=["a"]) == sorted(t.id for t in ts[:3])
            assert await ids(service_ids=[a.id[:7]]) == sorted(t.id for t in ts[:3])
            assert await ids(service_ids=["nosuch"]) == []
            assert await ids(node_ids=["n1"]) == sorted([ts[0].id, ts[2].id, ts[3].id])
            assert await ids(service_ids=["a"], desired_states=[types_pb2.RUNNING]) == sorted([ts[0].id, ts[1].id])
            assert await ids(labels={"stack": "st"}) == sorted(t.id for t in ts[:3])
            assert await ids(labels={"stack": "other"}) == []
            assert await ids(id_prefixes=[ts[3].id[:10]]) == [ts[3].id]
            got = (await s.stub.GetTask(control_pb2.GetTaskRequest(task_id=ts[3].id[:10]))).task
            assert got.id == ts[3].id
            await expect(C.NOT_FOUND, s.stub.GetTask(control_pb2.GetTaskRequest(task_id="zzzz")))

    run(main())


def test_list_filters_for_services_networks_secrets_configs(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            for name, lab in (("web", {"tier": "front"}), ("web2", {}), ("db", {"tier": "back"})):
                await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=svc_spec(name, labels=lab)))
                await s.stub.CreateSecret(control_pb2.CreateSecretRequest(spec=specs_pb2.SecretSpec(
                    annotations=types_pb2.Annotations(name=name, labels=lab), data=b"x")))
                await s.stub.CreateConfig(control_pb2.CreateConfigRequest(spec=specs_pb2.ConfigSpec(
                    annotations=types_pb2.Annotations(name=name, labels=lab), data=b"x")))
                await s.stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=specs_pb2.NetworkSpec(
                    annotations=types_pb2.Annotations(name=name, labels=lab))))
            calls = {
                "services": (s.stub.ListServices, control_pb2.ListServicesRequest),
                "secrets": (s.stub.ListSecrets, control_pb2.ListSecretsRequest),
                "configs": (s.stub.ListConfigs, control_pb2.ListConfigsRequest),
                "networks": (s.stub.ListNetworks, control_pb2.ListNetworksRequest),
            }
            for field, (call, req) in calls.items():
                async def names(field=field, call=call, req=req, **kw):
                    r = await call(req(filters=control_pb2.ListFilters(**kw)))
                    return [o.spec.annotations.name for o in getattr(r, field)]

                assert await names() == ["db", "web", "web2"]
                assert await names(names=["web"]) == ["web"]
                assert await names(name_prefixes=["we"]) == ["web", "web2"]
                assert await names(labels={"tier": ""}) == ["db", "web"]
                assert await names(labels={"tier": "back"}) == ["db"]
                one = s.store.resolve(field[:-1], "db")
                assert await names(id_prefixes=[one.id[:12]]) == ["db"]
                if field == "secrets":
                    r = await call(req())
                    assert all(not o.spec.data for o in r.secrets)

    run(main())


def test_cluster_get_update_rotate_and_redaction(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            await expect(C.NOT_FOUND, s.stub.GetCluster(control_pb2.GetClusterRequest()), "cluster")
            from shoal.manager.ca import generate_join_token

            pem = ca_cert_pem()
            cl = objects_pb2.Cluster(spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default")),
                                     root_ca=objects_pb2.RootCA(ca_key=b"KEY", ca_cert=pem))
            cl.root_ca.join_tokens.worker = generate_join_token(pem)
            cl.root_ca.join_tokens.manager = generate_join_token(pem)
            cl.network_bootstrap_keys.add(subsystem="networking:gossip", key=b"k")
            cl = await s.store.update(lambda tx: tx.create(cl))
            got = (await s.stub.GetCluster(control_pb2.GetClusterRequest())).cluster
            assert got.id == cl.id and not got.root_ca.ca_key
            assert not got.network_bootstrap_keys and got.root_ca.ca_cert == pem
            old = got.root_ca.join_tokens

            spec = specs_pb2.ClusterSpec()
            spec.CopyFrom(got.spec)
            spec.orchestration.task_history_retention_limit = 3
            upd = (await s.stub.UpdateCluster(control_pb2.UpdateClusterRequest(
                cluster_version=got.meta.version, spec=spec, rotate_worker_token=True))).cluster
            assert upd.spec.orchestration.task_history_retention_limit == 3
            assert upd.root_ca.join_tokens.worker != old.worker and upd.root_ca.join_tokens.manager == old.manager
            assert upd.root_ca.join_tokens.worker.startswith("SWMTKN-1-")
            assert upd.root_ca.join_tokens.worker.split("-")[2] == old.worker.split("-")[2]
            assert not upd.root_ca.ca_key
            stored = s.store.cluster()
            assert stored.root_ca.ca_key == b"KEY"

            await expect(C.ABORTED, s.stub.UpdateCluster(control_pb2.UpdateClusterRequest(
                cluster_version=got.meta.version, spec=spec)), "out of sequence")
            spec.annotations.name = "other"
            await expect(C.INVALID_ARGUMENT, s.stub.UpdateCluster(control_pb2.UpdateClusterRequest(spec=spec)),
                         "renamed")
            spec.annotations.name = ""
            upd2 = (await s.stub.UpdateCluster(control_pb2.UpdateClusterRequest(
                spec=spec, rotate_manager_token=True))).cluster
            assert upd2.spec.annotations.name == "default"
            assert upd2.root_ca.join_tokens.manager != old.manager

    run(main())


class FakeManagerFacts:
    """What a daemon's manager object gives Info (node id and Raft facts)."""

    node_id = "self-node"

    async def info(self) -> control_pb2.InfoResponse:
        return control_pb2.InfoResponse(node_id=self.node_id, is_manager=True, leader_node_id="self-node",
                                        members=[control_pb2.RaftMember(node_id="self-node", leader=True,
                                                                        reachable=True, addr="127.0.0.1:2378")])


class SyncManagerFacts:
    """The daemon's Manager answers info() synchronously, with cluster_id and store_version set."""

    def info(self) -> control_pb2.InfoResponse:
        return control_pb2.InfoResponse(node_id="n9", is_manager=True, cluster_id="c9", store_version=1)


def test_info_from_a_synchronous_manager(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path, manager=SyncManagerFacts()) as s:
            await s.store.update(lambda tx: tx.create(objects_pb2.Node()))
            info = await s.stub.Info(control_pb2.InfoRequest())
            assert (info.node_id, info.cluster_id, info.store_version) == ("n9", "c9", s.store.sm.version)

    run(main())


def test_info(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            m = await s.store.update(lambda tx: tx.create(make_node("m1", types_pb2.MANAGER)))
            info = await s.stub.Info(control_pb2.InfoRequest())
            assert info.node_id == m.id and info.leader_node_id == m.id and info.is_manager
            assert [x.node_id for x in info.members] == [m.id] and info.store_version == s.store.sm.version
        async with served(tmp_path, manager=FakeManagerFacts()) as s:
            cl = await s.store.update(lambda tx: tx.create(objects_pb2.Cluster(
                spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default")))))
            info = await s.stub.Info(control_pb2.InfoRequest())
            assert info.node_id == "self-node" and info.members[0].addr == "127.0.0.1:2378"
            assert info.cluster_id == cl.id

    run(main())


def test_remote_callers_must_hold_a_manager_identity() -> None:
    from shoal.manager import ca
    from shoal.manager.controlapi import ControlServicer, add_to_server
    from shoal.manager.store import LocalStore

    root = ca.RootCA.create("cl1")

    manager, worker = identity(root, types_pb2.MANAGER, "m1"), identity(root, types_pb2.WORKER, "w1")

    async def main() -> None:
        server = grpc.aio.server()
        add_to_server(ControlServicer(LocalStore()), server)
        port = server.add_secure_port("127.0.0.1:0", ca.NodeCredentials(manager).server_credentials())
        await server.start()
        try:
            async with ca.secure_channel(f"127.0.0.1:{port}", worker) as ch:
                stub = control_pb2_grpc.ControlStub(ch)
                await expect(C.PERMISSION_DENIED, stub.ListServices(control_pb2.ListServicesRequest()),
                             "node w1 is a worker")
            async with ca.secure_channel(f"127.0.0.1:{port}", manager) as ch:
                stub = control_pb2_grpc.ControlStub(ch)
                assert (await stub.ListServices(control_pb2.ListServicesRequest())).services == []
        finally:
            await server.stop(None)

    run(main())


class RacingStore:
    """A LocalStore where another writer (a control loop) changes an object just before the first
    `races` proposals: the control API must build its transaction again from the new state."""

    def __new__(cls, races: int):
        from shoal.manager.store import LocalStore, Tx

        class _Racing(LocalStore):
            def __init__(self) -> None:
                super().__init__()
                self.races = races
                self.victim = ""

            async def propose(self, txn):
                if self.races and self.victim:
                    self.races -= 1
                    cur = objects_pb2.Task()
                    cur.CopyFrom(self.sm.get("task", self.victim))
                    cur.status.message += "+"
                    other = Tx(self.sm)
                    other.update(cur)
                    self.sm.apply(other.transaction())
                return await super().propose(txn)

        return _Racing()


def test_writes_are_rebuilt_when_a_control_loop_wins_the_race(tmp_path) -> None:
    async def main() -> None:
        store = RacingStore(races=2)
        async with served(tmp_path, store=store) as s:
            svc = (await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=svc_spec()))).service
            t = await s.store.update(lambda tx: tx.create(objects_pb2.Task(
                service_id=svc.id, slot=1, desired_state=types_pb2.RUNNING)))
            store.victim = t.id
            await s.stub.RemoveService(control_pb2.RemoveServiceRequest(service_id="web"))
            assert s.store.get("service", svc.id) is None
            got = s.store.get("task", t.id)
            assert got.desired_state == types_pb2.REMOVE and got.status.message == "++"

    run(main())
