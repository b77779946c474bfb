#!/usr/bin/env bash
# Offline: the Star Wars policies traced for tiefighter and xwing against deathstar.
set -euo pipefail
cd "$(dirname "$0")/.."
F=.venv/bin/flagella
DEATHSTAR="k8s:org=empire,k8s:class=deathstar"
for policy in examples/starwars/sw_l3_l4_policy.yaml examples/starwars/sw_l3_l4_l7_policy.yaml; do
  echo "=== $policy"
  $F policy validate "$policy"
  for ship in "tiefighter:k8s:org=empire,k8s:class=tiefighter" "xwing:k8s:org=alliance,k8s:class=xwing"; do
    name=${ship%%:*}; labels=${ship#*:}
    echo "--- $name: POST /v1/request-landing"
    $F policy trace --policy "$policy" --src-labels "$labels" --dst-labels "$DEATHSTAR" \
       --dport 80/TCP --http-method POST --http-path /v1/request-landing | tail -n 1
  done
  echo "--- tiefighter: PUT /v1/exhaust-port"
  $F policy trace --policy "$policy" --src-labels "k8s:org=empire,k8s:class=tiefighter" \
     --dst-labels "$DEATHSTAR" --dport 80/TCP --http-method PUT --http-path /v1/exhaust-port | tail -n 1
done
