use std::{collections::BTreeMap, path::Path};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::*;
use crate::manifest::parse_str;

type Rule = fn(&str) -> Result<(), String>;

/// (rule name, rule, input, valid?)
const STRING_RULES: &[(&str, Rule, &str, bool)] = &[
    ("dns1123_label", dns1123_label, "web", true),
    ("dns1123_label", dns1123_label, "web-1", true),
    ("dns1123_label", dns1123_label, "1web", true),
    ("dns1123_label", dns1123_label, "", false),
    ("dns1123_label", dns1123_label, "Web", false),
    ("dns1123_label", dns1123_label, "web_1", false),
    ("dns1123_label", dns1123_label, "-web", false),
    ("dns1123_label", dns1123_label, "web-", false),
    ("dns1123_label", dns1123_label, "web.default", false),
    ("dns1123_label", dns1123_label, LONG_64, false),
    ("dns1035_label", dns1035_label, "web", true),
    ("dns1035_label", dns1035_label, "1web", false),
    ("dns1035_label", dns1035_label, "web-", false),
    (
        "dns1123_subdomain",
        dns1123_subdomain,
        "nginx-7c5ddbdf54-abcde",
        true,
    ),
    ("dns1123_subdomain", dns1123_subdomain, "web.v1", true),
    ("dns1123_subdomain", dns1123_subdomain, "web..v1", false),
    ("dns1123_subdomain", dns1123_subdomain, ".web", false),
    ("dns1123_subdomain", dns1123_subdomain, "Web", false),
    ("iana_svc_name", iana_svc_name, "http", true),
    ("iana_svc_name", iana_svc_name, "http-alt", true),
    ("iana_svc_name", iana_svc_name, "h2c", true),
    ("iana_svc_name", iana_svc_name, "", false),
    ("iana_svc_name", iana_svc_name, "8080", false),
    ("iana_svc_name", iana_svc_name, "HTTP", false),
    ("iana_svc_name", iana_svc_name, "http_alt", false),
    ("iana_svc_name", iana_svc_name, "http--alt", false),
    ("iana_svc_name", iana_svc_name, "-http", false),
    ("iana_svc_name", iana_svc_name, "sixteen-chars-xx", false),
    ("label_key", label_key, "app", true),
    ("label_key", label_key, "App.Name_1", true),
    ("label_key", label_key, "app.kubernetes.io/name", true),
    ("label_key", label_key, "kubernetes.io/service-name", true),
    ("label_key", label_key, "", false),
    ("label_key", label_key, "/app", false),
    ("label_key", label_key, "Example.com/app", false),
    ("label_key", label_key, "a/b/c", false),
    ("label_key", label_key, "-app", false),
    ("label_key", label_key, "app name", false),
    ("label_key", label_key, LONG_64, false),
    ("label_value", label_value, "", true),
    ("label_value", label_value, "nginx", true),
    ("label_value", label_value, "v1.2_rc-3", true),
    ("label_value", label_value, "has space", false),
    ("label_value", label_value, "-x", false),
    ("label_value", label_value, "x/y", false),
    ("label_value", label_value, LONG_64, false),
    ("cidr", cidr, "10.0.0.0/8", true),
    ("cidr", cidr, "10.1.2.3/32", true),
    ("cidr", cidr, "fd00::/64", true),
    ("cidr", cidr, "10.0.0.0", false),
    ("cidr", cidr, "10.0.0.0/33", false),
    ("cidr", cidr, "10.0.0/8", false),
    ("cidr", cidr, "fd00::/129", false),
];

const LONG_64: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

#[test]
fn string_rules() {
    assert_eq!(LONG_64.len(), 64);
    for (name, rule, input, valid) in STRING_RULES {
        assert_eq!(
            rule(input).is_ok(),
            *valid,
            "{name}({input:?}) gave {:?}",
            rule(input)
        );
    }
}

/// (case, manifest, field of the error, text its message contains)
const INVALID: &[(&str, &str, &str, &str)] = &[
    (
        "missing name",
        "apiVersion: v1\nkind: Namespace\nmetadata: {}\n",
        "metadata.name",
        "is required",
    ),
    (
        "namespace name not a label",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team.a}\n",
        "metadata.name",
        "invalid name \"team.a\": a lowercase RFC 1123 label",
    ),
    (
        "service name not a label",
        "apiVersion: v1\nkind: Service\nmetadata: {name: 1web}\nspec: {ports: [{port: 80}]}\n",
        "metadata.name",
        "DNS-1035 label",
    ),
    (
        "pod name not a subdomain",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: Web}\nspec: {containers: [{name: c, image: i}]}\n",
        "metadata.name",
        "RFC 1123 subdomain",
    ),
    (
        "namespace field not a label",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: Prod}\nspec: {containers: [{name: c, image: i}]}\n",
        "metadata.namespace",
        "invalid namespace \"Prod\"",
    ),
    (
        "label key",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {\"bad key\": x}}\n",
        "metadata.labels",
        "invalid label key \"bad key\"",
    ),
    (
        "label value",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {app: \"a b\"}}\n",
        "metadata.labels.app",
        "invalid label value \"a b\"",
    ),
    (
        "service port out of range",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 70000}]}\n",
        "spec.ports[0].port",
        "must be between 1 and 65535 (got 70000)",
    ),
    (
        "service port zero",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 0}]}\n",
        "spec.ports[0].port",
        "(got 0)",
    ),
    (
        "service port protocol",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, protocol: tcp}]}\n",
        "spec.ports[0].protocol",
        "unsupported protocol \"tcp\": must be one of TCP, UDP, SCTP",
    ),
    (
        "target port number",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: 65536}]}\n",
        "spec.ports[0].targetPort",
        "(got 65536)",
    ),
    (
        "target port name",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: HTTP_alt}]}\n",
        "spec.ports[0].targetPort",
        "invalid port name \"HTTP_alt\"",
    ),
    (
        "target port name too long",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: http-management-x}]}\n",
        "spec.ports[0].targetPort",
        "1 to 15 characters",
    ),
    (
        "node port",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 99999}]}\n",
        "spec.ports[0].nodePort",
        "(got 99999)",
    ),
    (
        "external IP",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {externalIPs: [192.0.2.1, 192.0.2.300], ports: [{port: 80}]}\n",
        "spec.externalIPs[1]",
        "must be a valid IP address (got \"192.0.2.300\")",
    ),
    (
        "load balancer source range",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: LoadBalancer, loadBalancerSourceRanges: [10.0.0.0/33], ports: [{port: 80}]}\n",
        "spec.loadBalancerSourceRanges[0]",
        "must be a CIDR such as 192.0.2.0/24 (got \"10.0.0.0/33\")",
    ),
    (
        "load balancer ingress IP",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: LoadBalancer, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: lb.example.com}]}}\n",
        "status.loadBalancer.ingress[0].ip",
        "must be a valid IP address (got \"lb.example.com\")",
    ),
    (
        "health check node port",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 70000, ports: [{port: 80}]}\n",
        "spec.healthCheckNodePort",
        "(got 70000)",
    ),
    (
        "external traffic policy value",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, externalTrafficPolicy: local, ports: [{port: 80}]}\n",
        "spec.externalTrafficPolicy",
        "unsupported traffic policy \"local\": must be one of Cluster, Local",
    ),
    (
        "external traffic policy on a ClusterIP service",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {externalTrafficPolicy: Local, ports: [{port: 80}]}\n",
        "spec.externalTrafficPolicy",
        "may only be set for a NodePort or LoadBalancer service or one with externalIPs",
    ),
    (
        "internal traffic policy value",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {internalTrafficPolicy: Node, ports: [{port: 80}]}\n",
        "spec.internalTrafficPolicy",
        "unsupported traffic policy \"Node\"",
    ),
    (
        "health check node port without traffic policy Local",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: LoadBalancer, healthCheckNodePort: 32000, ports: [{port: 80}]}\n",
        "spec.healthCheckNodePort",
        "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
    ),
    (
        "node port on a ClusterIP service",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, nodePort: 30080}]}\n",
        "spec.ports[0].nodePort",
        "may not be used when type is ClusterIP",
    ),
    (
        "duplicate port name",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{name: http, port: 80}, {name: http, port: 81}]}\n",
        "spec.ports[1].name",
        "duplicate port name \"http\"",
    ),
    (
        "duplicate port and protocol",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{name: a, port: 80}, {name: b, port: 80, protocol: TCP}]}\n",
        "spec.ports[1]",
        "duplicate port 80/TCP",
    ),
    (
        "unnamed port among several",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{name: a, port: 80}, {port: 81}]}\n",
        "spec.ports[1].name",
        "is required when the service has more than one port",
    ),
    (
        "service port name",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{name: Http, port: 80}]}\n",
        "spec.ports[0].name",
        "invalid port name \"Http\"",
    ),
    (
        "service type",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: Internal, ports: [{port: 80}]}\n",
        "spec.type",
        "unsupported service type \"Internal\": must be one of ClusterIP, NodePort, LoadBalancer, ExternalName",
    ),
    (
        "cluster IP not IPv4",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: \"fd00::10\", ports: [{port: 80}]}\n",
        "spec.clusterIP",
        "must be an IPv4 address, \"None\" or empty (got \"fd00::10\")",
    ),
    (
        "cluster IP garbage",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
        "spec.clusterIP",
        "(got \"10.96.0.300\")",
    ),
    (
        "service without ports",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}}\n",
        "spec.ports",
        "is required",
    ),
    (
        "external name missing",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: ExternalName}\n",
        "spec.externalName",
        "is required",
    ),
    (
        "service selector",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: \"a b\"}, ports: [{port: 80}]}\n",
        "spec.selector.app",
        "invalid label value",
    ),
    (
        "container port",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i, ports: [{containerPort: 0}]}]}\n",
        "spec.containers[0].ports[0].containerPort",
        "(got 0)",
    ),
    (
        "container port name",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i, ports: [{containerPort: 80, name: \"80\"}]}]}\n",
        "spec.containers[0].ports[0].name",
        "must contain at least one letter",
    ),
    (
        "container port protocol",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i, ports: [{containerPort: 80, protocol: ICMP}]}]}\n",
        "spec.containers[0].ports[0].protocol",
        "unsupported protocol \"ICMP\"",
    ),
    (
        "pod without containers",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n",
        "spec.containers",
        "at least one container",
    ),
    (
        "container without image",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n",
        "spec.containers[0].image",
        "is required",
    ),
    (
        "deployment without selector",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    metadata: {labels: {app: d}}\n    spec: {containers: [{name: c, image: i}]}\n",
        "spec.selector",
        "is required",
    ),
    (
        "deployment selector does not match",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: e}}\n  template:\n    metadata: {labels: {app: d}}\n    spec: {containers: [{name: c, image: i}]}\n",
        "spec.template.metadata.labels",
        "`selector` does not match template `labels`",
    ),
    (
        "deployment expression does not match",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchExpressions: [{key: tier, operator: Exists}]}\n  template:\n    metadata: {labels: {app: d}}\n    spec: {containers: [{name: c, image: i}]}\n",
        "spec.template.metadata.labels",
        "does not match",
    ),
    (
        "deployment selector operator",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchExpressions: [{key: app, operator: Equals, values: [d]}]}\n  template:\n    metadata: {labels: {app: d}}\n    spec: {containers: [{name: c, image: i}]}\n",
        "spec.selector.matchExpressions[0].operator",
        "unsupported operator \"Equals\"",
    ),
    (
        "negative replicas",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  replicas: -1\n  selector: {matchLabels: {app: d}}\n  template:\n    metadata: {labels: {app: d}}\n    spec: {containers: [{name: c, image: i}]}\n",
        "spec.replicas",
        "must be greater than or equal to 0 (got -1)",
    ),
    (
        "deployment template container port",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: d}}\n  template:\n    metadata: {labels: {app: d}}\n    spec: {containers: [{name: c, image: i, ports: [{containerPort: 65536}]}]}\n",
        "spec.template.spec.containers[0].ports[0].containerPort",
        "(got 65536)",
    ),
    (
        "policy endPort below port",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, ingress: [{ports: [{port: 8080, endPort: 80}]}]}\n",
        "spec.ingress[0].ports[0].endPort",
        "must be greater than or equal to port 8080 (got 80)",
    ),
    (
        "policy endPort with named port",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, egress: [{ports: [{port: http, endPort: 90}]}]}\n",
        "spec.egress[0].ports[0].endPort",
        "may not be set unless port is a number",
    ),
    (
        "policy endPort without port",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, egress: [{ports: [{endPort: 90}]}]}\n",
        "spec.egress[0].ports[0].endPort",
        "may not be set unless port is a number",
    ),
    (
        "policy port protocol",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, ingress: [{ports: [{port: 53, protocol: DNS}]}]}\n",
        "spec.ingress[0].ports[0].protocol",
        "unsupported protocol",
    ),
    (
        "policy type",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, policyTypes: [Inbound]}\n",
        "spec.policyTypes[0]",
        "unsupported policy type \"Inbound\"",
    ),
    (
        "policy peer mixes ipBlock and selector",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}\n",
        "spec.ingress[0].from[0]",
        "may not combine ipBlock",
    ),
    (
        "policy CIDR",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/40}}]}]}\n",
        "spec.egress[0].to[0].ipBlock.cidr",
        "invalid CIDR \"10.0.0.0/40\"",
    ),
    (
        "policy except outside cidr",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24, 10.1.0.0/24]}}]}]}\n",
        "spec.ingress[0].from[0].ipBlock.except[1]",
        "must be a strict subset of cidr 10.0.0.0/16 (got 10.1.0.0/24)",
    ),
    (
        "policy except equal to cidr",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/16]}}]}]}\n",
        "spec.egress[0].to[0].ipBlock.except[0]",
        "must be a strict subset of cidr",
    ),
    (
        "policy except of the other family",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [\"fd00::/64\"]}}]}]}\n",
        "spec.egress[0].to[0].ipBlock.except[0]",
        "must be a strict subset of cidr",
    ),
    (
        "policy except not a CIDR",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0]}}]}]}\n",
        "spec.egress[0].to[0].ipBlock.except[0]",
        "invalid CIDR \"10.1.0.0\"",
    ),
    (
        "policy type listed twice",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, policyTypes: [Egress, Egress]}\n",
        "spec.policyTypes[1]",
        "duplicate value \"Egress\"",
    ),
    (
        "policy selector operator",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: Matches, values: [a]}]}}]}]}\n",
        "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator",
        "unsupported operator \"Matches\"",
    ),
    (
        "policy In without values",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, egress: [{to: [{namespaceSelector: {matchExpressions: [{key: team, operator: NotIn}]}}]}]}\n",
        "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values",
        "must be specified when operator is NotIn",
    ),
    (
        "policy pod selector label value",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {matchLabels: {app: \"a b\"}}}\n",
        "spec.podSelector.matchLabels.app",
        "invalid label value",
    ),
    (
        "policy second port endPort below port",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80}, {port: 90, endPort: 80}]}]}\n",
        "spec.ingress[0].ports[1].endPort",
        "must be greater than or equal to port 90 (got 80)",
    ),
    (
        "policy endPort out of range",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, ingress: [{ports: [{port: 90, endPort: 70000}]}]}\n",
        "spec.ingress[0].ports[0].endPort",
        "(got 70000)",
    ),
    (
        "policy empty peer",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, ingress: [{from: [{}]}]}\n",
        "spec.ingress[0].from[0]",
        "must specify podSelector, namespaceSelector or ipBlock",
    ),
    (
        "namespace label key",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {\"-team\": a}}\n",
        "metadata.labels",
        "invalid label key \"-team\"",
    ),
    (
        "namespace name",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x.y}\n",
        "metadata.name",
        "invalid name \"x.y\"",
    ),
    (
        "slice address type",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IP\nendpoints: []\n",
        "addressType",
        "unsupported address type \"IP\"",
    ),
    (
        "slice address",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1, \"fd00::1\"]}]\n",
        "endpoints[0].addresses[1]",
        "must be a valid IPv4 address (got \"fd00::1\")",
    ),
    (
        "slice port",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\nports: [{name: http, port: 0}]\n",
        "ports[0].port",
        "(got 0)",
    ),
    (
        "slice port protocol",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\nports: [{port: 80, protocol: HTTP}]\n",
        "ports[0].protocol",
        "unsupported protocol",
    ),
];

#[test]
fn invalid_objects_are_refused() {
    for (case, yaml, field, message) in INVALID {
        let error = match parse_str(Path::new("t.yaml"), yaml) {
            Ok(manifests) => panic!("{case}: accepted: {manifests:?}"),
            Err(e) => e,
        };
        assert_eq!(
            error.field.as_deref(),
            Some(*field),
            "{case}: wrong field in: {error}"
        );
        assert!(
            error.message.contains(message),
            "{case}: message {:?} lacks {message:?}",
            error.message
        );
    }
}

/// Manifests the API server accepts, each at the edge of a rule above.
const VALID: &[(&str, &str)] = &[
    (
        "headless service without ports",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None}\n",
    ),
    (
        "external name with trailing dot",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: example.com.}\n",
    ),
    (
        "service ports at the limits, named target port, node port",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: a, port: 1, targetPort: http}\n  - {name: b, port: 65535, protocol: UDP, nodePort: 30000}\n  - {name: c, port: 65535, protocol: SCTP, targetPort: 0}\n",
    ),
    (
        "same port number over two protocols",
        "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec: {ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}\n",
    ),
    (
        "deployment selector with expressions",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  replicas: 0\n  selector:\n    matchLabels: {app: d}\n    matchExpressions:\n    - {key: tier, operator: In, values: [web, api]}\n    - {key: canary, operator: DoesNotExist}\n  template:\n    metadata: {labels: {app: d, tier: web}}\n    spec: {containers: [{name: c, image: i, ports: [{containerPort: 80, name: http}]}]}\n",
    ),
    (
        "policy port range",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Ingress, Egress], ingress: [{ports: [{port: 8000, endPort: 8000}, {port: http}], from: [{namespaceSelector: {}, podSelector: {}}, {ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]}\n",
    ),
    (
        "policy ipBlocks with nested excepts, both families, every operator",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [db]}, {key: canary, operator: DoesNotExist}]}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.1.1/32]}\n    - ipBlock: {cidr: \"fd00::/8\", except: [\"fd00::/16\"]}\n    - namespaceSelector: {matchExpressions: [{key: team, operator: Exists}]}\n    ports: [{port: 1, endPort: 65535, protocol: SCTP}, {protocol: UDP}]\n",
    ),
    (
        "namespace with labels",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a, kubernetes.io/metadata.name: x}}\n",
    ),
    (
        "slice with unnamed port and no endpoints",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []\nports: [{port: 8080}]\n",
    ),
];

#[test]
fn valid_objects_are_accepted() {
    for (case, yaml) in VALID {
        if let Err(e) = parse_str(Path::new("t.yaml"), yaml) {
            panic!("{case}: refused: {e}");
        }
    }
}

#[test]
fn selectors_match_like_the_api_server() {
    let labels: BTreeMap<String, String> = [("app", "web"), ("tier", "front")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let selector = |yaml: &str| -> LabelSelector {
        serde_saphyr::from_str(yaml).expect("test selector parses")
    };
    let cases = [
        ("{}", true),
        ("{matchLabels: {app: web}}", true),
        ("{matchLabels: {app: db}}", false),
        ("{matchLabels: {app: web, env: prod}}", false),
        (
            "{matchExpressions: [{key: tier, operator: In, values: [front, back]}]}",
            true,
        ),
        (
            "{matchExpressions: [{key: tier, operator: NotIn, values: [front]}]}",
            false,
        ),
        (
            "{matchExpressions: [{key: env, operator: NotIn, values: [prod]}]}",
            true,
        ),
        ("{matchExpressions: [{key: app, operator: Exists}]}", true),
        (
            "{matchExpressions: [{key: app, operator: DoesNotExist}]}",
            false,
        ),
        (
            "{matchExpressions: [{key: env, operator: DoesNotExist}]}",
            true,
        ),
    ];
    for (yaml, expected) in cases {
        assert_eq!(
            sluice_store::selector::matches(&selector(yaml), &labels),
            expected,
            "{yaml}"
        );
    }
}

#[test]
fn policy_errors_name_file_document_object_and_field() {
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: x}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80}, {port: 90, endPort: 80}]}]}\n";
    let error = match parse_str(Path::new("policy.yaml"), yaml) {
        Ok(manifests) => panic!("accepted: {manifests:?}"),
        Err(e) => e,
    };
    assert_eq!(
        error.to_string(),
        "policy.yaml: document 2: NetworkPolicy x/np: spec.ingress[0].ports[1].endPort: \
         must be greater than or equal to port 90 (got 80)"
    );
}
