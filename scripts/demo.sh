#!/usr/bin/env bash
# The demo: a one-node lab with the seed's nginx Deployment (2 replicas) behind the ClusterIP
# Service nginx-service, a client pod that calls the service, and the agent's view of it;
# then seed 003's LoadBalancer scenario on two nodes (scripts/demo-seed003.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/demo-lib.sh
demo_init demo

step "sluice lab up: one node (a network namespace) running its own agent"
sl lab up -f examples/lab.yaml

step "kubectl-style apply of the seed's manifest and a client pod"
sl lab apply -f examples/nginx.yaml -f examples/client.yaml
sl lab get pods -o wide
sl lab get services
sl lab get endpoints

vip=$(sl lab get services -o json | jq -r '.[] | select(.name=="nginx-service") | .cluster_ip')
step "20 requests from the client pod to http://$vip/ (the ClusterIP, translated in eBPF)"
declare -A count
for i in $(seq 1 20); do
  backend=$(sl lab exec default/client -- curl -s --max-time 2 "http://$vip/")
  echo "request $i -> $backend"
  count[$backend]=$(( ${count[$backend]:-0} + 1 ))
done
step "requests per backend"
for b in "${!count[@]}"; do echo "$b: ${count[$b]}"; done

step "NetworkPolicy: nginx accepts ingress only from role=frontend (examples/policy.yaml)"
sl lab apply --dry-run -f - < examples/policy.yaml
sl lab apply -f examples/policy.yaml
try() { # try <pod>: one request to the VIP, its HTTP status or "timed out"
  local code
  if code=$(sl lab exec "default/$1" -- curl -s --max-time 2 -o /dev/null -w '%{http_code}' "http://$vip/"); then
    echo "$1 -> $vip: HTTP $code"
  else
    echo "$1 -> $vip: timed out (denied by policy)"
  fi
}
try frontend
try client
step "sluice observe: the denied connection, by identity, with its reason"
sl observe --last 200 --pod default/client --type policy-verdict
sl observe --last 200 --pod default/client --verdict DROPPED | tail -n 3
step "the policy action log and the metrics endpoint say the same"
tail -n 2 "$SLUICE_LAB_STATE/$lab/nodes/node-1/policy_action.log"
sl lab exec default/client -- curl -s http://10.244.1.1:9962/metrics | grep '^sluice_drop_packets_total.*POLICY_DENIED'
step "sluice lab probe: the reachability matrix on port 80 (. allowed, X denied)"
sl lab probe --namespace default --port 80 --protocol TCP --timeout 500ms
step "sluice endpoint list / identity list"
sl endpoint list
sl identity list
nginx_pod=$(sl lab get pods -o json | jq -r '[.[] | select(.name | startswith("nginx"))][0] | "\(.namespace)/\(.name)"')
step "sluice policy get $nginx_pod (allow rows with their counters)"
sl policy get "$nginx_pod"
step "deleting the policy: the running client connects at once"
sl lab delete -f examples/policy.yaml
try client

step "sluice service list"
sl service list
step "sluice ct list (first 10 entries)"
sl ct list | sed -n 1,11p
step "sluice status"
sl status
step "sluice verify"
sl verify

step "tearing down"
sl lab down
trap - EXIT

step "seed 003: a LoadBalancer Service on two nodes, the lab playing the cloud"
bash scripts/demo-seed003.sh
