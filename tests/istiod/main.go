// Command istiod-local runs istiod's own translation code without Kubernetes, for a local mesh
// of real Envoy proxies (scripts/mesh.sh) and the end-to-end tests.
//
//	istiod-local serve     --config FILE... [--ca PEM] [--endpoint HOST=IP:PORT]... [flags]
//	istiod-local bootstrap --type sidecar|router --ip IP --name NAME --namespace NS [flags]
//	istiod-local wait      --proxy NAME=ADMIN_ADDR[,LOG_FILE]... [--timeout 60s]
//	istiod-local validate  FILE...   (validate as serve would, print a summary)
//	istiod-local hosts     FILE...   (the MESH_EXTERNAL ServiceEntry hosts, one per line)
//
// serve: istio.io/istio/pilot/test/xds's FakeDiscoveryServer (istiod's real config generators,
// the WasmPlugin translation, EnvoyFilter patching, the ServiceEntry and Kubernetes service
// registries) serving ADS on a real TCP port, fed with Istio YAML files. Every object passes
// Istio's own validation first (see config.go). POST /reload on the admin address (or SIGHUP)
// reads the files again and pushes what changed to the connected proxies; an invalid change is
// refused and the old configuration keeps serving. It also serves the proxies' SDS socket with
// istio-agent's own SDS server (see sds.go) and can point provider hosts at local addresses
// (see endpoints.go, the one place where this departs from istiod).
//
// bootstrap: the Envoy bootstrap of a sidecar or gateway proxy: node identity and metadata as
// istio-agent sends them, an ADS cluster to serve, and the SDS cluster; nothing else.
//
// wait: polls each proxy's admin interface until its listeners are warm and every ECDS filter
// it subscribed to is accepted, and fails naming what a proxy rejected.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: istiod-local serve|bootstrap|wait [flags] (-h for the flags of each)")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "bootstrap":
		err = bootstrap(os.Args[2:])
	case "wait":
		err = wait(os.Args[2:])
	case "validate":
		err = validate(os.Args[2:])
	case "hosts":
		err = hosts(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q (serve, bootstrap, wait, validate, hosts)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "istiod-local %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// listFlag collects a repeated flag.
type listFlag []string

func (l *listFlag) String() string { return fmt.Sprint([]string(*l)) }

func (l *listFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}
