#!/usr/bin/env bash
# Seed 003's scenario as a demo: a LoadBalancer Service fronting three nginx pods on two
# nodes, the lab playing the cloud (a VIP from its pool, a router spreading it over the
# nodes, a health check with a 6 s delay) and a client out on the internet behind the
# router. ETP=Cluster: every request through the VIP succeeds. ETP=Local with one replica:
# what still lands on the pod-less node is refused at once, until the health check takes
# the node out of the VIP's next hops.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/demo-lib.sh
demo_init seed
# curl_loop <n> <url>: the seed's loop, from the client behind the router.
curl_loop() {
  for _ in $(seq 1 "$1"); do
    sl lab exec world/client -- curl -s -o /dev/null --max-time 6 \
      -w '%{http_code} %{time_total}\n' "$2" || true
  done
}

step "sluice lab up: two nodes, a VIP pool, a router in front of them, a client behind it"
sl lab up -f examples/lab-seed003.yaml
sl lab get world

step "the Service: one LoadBalancer, three frontends"
sl lab apply -f examples/seed003-nginx.yaml
sl lab get pods -n netflow-test -o wide
sl lab get services -n netflow-test
vip=$(sl lab get services -n netflow-test -o json | jq -r '.[] | select(.name=="nginx") | .external_ip')
step "sluice service list: ClusterIP, NodePort and LoadBalancer resolve to the same backends"
sl service list
step "the router's route to $vip: one next hop per node (ECMP, like a target pool)"
ip netns exec "sluice-$lab-router" ip route show proto 202

step "externalTrafficPolicy Cluster: ten requests through the VIP"
curl_loop 10 "http://$vip/"

step "externalTrafficPolicy Local, one replica: the pod-less node refuses (000), never black-holes"
sl lab apply -f examples/seed003-local.yaml
sl lab get pods -n netflow-test -o wide
curl_loop 20 "http://$vip/"

step "after the health check's delay (6 s) the router sends only to the pod's node"
sleep 7
ip netns exec "sluice-$lab-router" ip route show proto 202
curl_loop 10 "http://$vip/"

step "tearing down"
sl lab down
trap - EXIT
