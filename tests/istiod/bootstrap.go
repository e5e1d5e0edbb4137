package main

// The bootstrap of a proxy: what istio-agent would tell Envoy about itself (node id and
// metadata), the ADS cluster to the discovery server and the SDS cluster to istio-agent's socket.
// Everything else the proxy runs comes from istiod over ADS.

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
)

func bootstrap(args []string) error {
	fs := flag.NewFlagSet("bootstrap", flag.ContinueOnError)
	typ := fs.String("type", "sidecar", "sidecar or router (a gateway)")
	ip := fs.String("ip", "", "the proxy's (pod's) IP address, part of the node id")
	name := fs.String("name", "", "pod name")
	namespace := fs.String("namespace", "default", "pod namespace")
	labels := fs.String("labels", "", "pod labels, k=v,k=v (what WasmPlugin, EnvoyFilter, Gateway and policy selectors match)")
	workload := fs.String("workload", "", "workload (deployment) name; default: the pod name")
	xdsAddr := fs.String("xds", "", "the discovery server's ADS address, IP:PORT")
	sds := fs.String("sds", "", "the SDS socket (istiod-local serve's ROOT/var/run/secrets/workload-spiffe-uds/socket)")
	admin := fs.String("admin", "127.0.0.1:0", "Envoy admin address")
	version := fs.String("istio-version", "1.31.0", "ISTIO_VERSION the proxy reports (istiod gates features on it)")
	clusterID := fs.String("cluster-id", "Kubernetes", "CLUSTER_ID (istiod's default cluster)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *typ != "sidecar" && *typ != "router" {
		return fmt.Errorf("--type %q: sidecar or router", *typ)
	}
	if net.ParseIP(*ip) == nil {
		return fmt.Errorf("--ip %q: not an IP address", *ip)
	}
	if *name == "" || *xdsAddr == "" || *sds == "" {
		return errors.New("--name, --xds and --sds are required")
	}
	xdsHost, xdsPort, err := splitAddress(*xdsAddr)
	if err != nil {
		return fmt.Errorf("--xds: %v", err)
	}
	adminHost, adminPort, err := splitAddress(*admin)
	if err != nil {
		return fmt.Errorf("--admin: %v", err)
	}
	podLabels := map[string]string{}
	for _, kv := range strings.Split(*labels, ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("--labels: %q is not k=v", kv)
		}
		podLabels[k] = v
	}
	if *workload == "" {
		*workload = *name
	}
	http2 := map[string]any{
		"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": map[string]any{
			"@type":                "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
			"explicit_http_config": map[string]any{"http2_protocol_options": map[string]any{}},
		},
	}
	cluster := func(name string, address map[string]any) map[string]any {
		return map[string]any{
			"name":                             name,
			"type":                             "STATIC",
			"connect_timeout":                  "1s",
			"typed_extension_protocol_options": http2,
			"load_assignment": map[string]any{
				"cluster_name": name,
				"endpoints": []any{map[string]any{"lb_endpoints": []any{
					map[string]any{"endpoint": map[string]any{"address": address}},
				}}},
			},
		}
	}
	ads := map[string]any{"ads": map[string]any{}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
	doc := map[string]any{
		"node": map[string]any{
			// istio-agent's form: TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local
			"id":      fmt.Sprintf("%s~%s~%s.%s~%s.svc.cluster.local", *typ, *ip, *name, *namespace, *namespace),
			"cluster": fmt.Sprintf("%s.%s", *workload, *namespace),
			"metadata": map[string]any{
				"ISTIO_VERSION":     *version,
				"NAMESPACE":         *namespace,
				"NAME":              *name,
				"WORKLOAD_NAME":     *workload,
				"LABELS":            podLabels,
				"CLUSTER_ID":        *clusterID,
				"MESH_ID":           "cluster.local",
				"SERVICE_ACCOUNT":   "default",
				"INTERCEPTION_MODE": "NONE",
				"INSTANCE_IPS":      *ip,
			},
		},
		"admin": map[string]any{"address": socketAddress(adminHost, adminPort)},
		"dynamic_resources": map[string]any{
			"ads_config": map[string]any{
				"api_type":                       "DELTA_GRPC",
				"transport_api_version":          "V3",
				"set_node_on_first_message_only": true,
				"grpc_services":                  []any{map[string]any{"envoy_grpc": map[string]any{"cluster_name": "xds-grpc"}}},
			},
			"cds_config": ads,
			"lds_config": ads,
		},
		"static_resources": map[string]any{
			"clusters": []any{
				cluster("xds-grpc", socketAddress(xdsHost, xdsPort)),
				cluster("sds-grpc", map[string]any{"pipe": map[string]any{"path": *sds}}),
			},
		},
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(doc)
}

func splitAddress(addr string) (string, int, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		return "", 0, err
	}
	return host, n, nil
}

func socketAddress(host string, port int) map[string]any {
	return map[string]any{"socket_address": map[string]any{"address": host, "port_value": port}}
}
