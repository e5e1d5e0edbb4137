package main

// The one place where this server departs from istiod: provider hosts resolve to local mock
// providers. A ServiceEntry with `resolution: DNS` becomes a DNS cluster whose endpoint is the
// host name itself (port 443 for the rendered providers); for each --endpoint HOST=IP:PORT, every
// cluster sent to a proxy (Istio's own and those an EnvoyFilter adds) gets IP:PORT in place of
// any socket address naming HOST. Cluster names, SNI, certificate names, TLS settings and the
// rendered resources stay as they are: the proxy still originates TLS to "HOST", it only
// connects somewhere else. (A DNS answer could do the same for port 443 only; mocks listen on
// any free port.)

import (
	"fmt"
	"net"
	"strconv"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"istio.io/istio/pilot/pkg/model"
)

type hostPort struct {
	ip   string
	port uint32
}

func parseEndpoints(flags []string) (map[string]hostPort, error) {
	out := map[string]hostPort{}
	for _, f := range flags {
		host, addr, ok := strings.Cut(f, "=")
		if !ok || host == "" {
			return nil, fmt.Errorf("--endpoint %q: expected HOST=IP:PORT", f)
		}
		ip, port, err := net.SplitHostPort(addr)
		if err != nil || net.ParseIP(ip) == nil {
			return nil, fmt.Errorf("--endpoint %q: expected HOST=IP:PORT", f)
		}
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("--endpoint %q: bad port", f)
		}
		out[strings.ToLower(host)] = hostPort{ip: ip, port: uint32(n)}
	}
	return out, nil
}

// endpointOverride wraps istiod's CDS generator.
type endpointOverride struct {
	inner     model.XdsDeltaResourceGenerator
	endpoints map[string]hostPort
}

func (e *endpointOverride) Generate(proxy *model.Proxy, w *model.WatchedResource, req *model.PushRequest) (model.Resources, model.XdsLogDetails, error) {
	res, details, err := e.inner.Generate(proxy, w, req)
	if err != nil {
		return res, details, err
	}
	out, err := e.rewrite(res)
	return out, details, err
}

func (e *endpointOverride) GenerateDeltas(proxy *model.Proxy, req *model.PushRequest, w *model.WatchedResource) (model.Resources, model.DeletedResources, model.XdsLogDetails, bool, error) {
	res, deleted, details, delta, err := e.inner.GenerateDeltas(proxy, req, w)
	if err != nil {
		return res, deleted, details, delta, err
	}
	out, err := e.rewrite(res)
	return out, deleted, details, delta, err
}

// rewrite returns copies of the clusters that name an overridden host; the others as they are
// (istiod caches the originals). nil stays nil: it means "nothing to push", while an empty list
// is a full state of no clusters.
func (e *endpointOverride) rewrite(in model.Resources) (model.Resources, error) {
	if in == nil {
		return nil, nil
	}
	out := make(model.Resources, 0, len(in))
	for _, r := range in {
		c := &clusterv3.Cluster{}
		if err := r.GetResource().UnmarshalTo(c); err != nil {
			return nil, fmt.Errorf("cluster %s: %v", r.GetName(), err)
		}
		if !e.apply(c) {
			out = append(out, r)
			continue
		}
		a, err := anypb.New(c)
		if err != nil {
			return nil, err
		}
		out = append(out, &discovery.Resource{Name: r.GetName(), Resource: a, Aliases: r.GetAliases()})
	}
	return out, nil
}

func (e *endpointOverride) apply(c *clusterv3.Cluster) bool {
	changed := false
	for _, locality := range c.GetLoadAssignment().GetEndpoints() {
		for _, lb := range locality.GetLbEndpoints() {
			sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
			if sa == nil {
				continue
			}
			target, ok := e.endpoints[strings.ToLower(sa.GetAddress())]
			if !ok {
				continue
			}
			sa.Address = target.ip
			sa.PortSpecifier = &corev3.SocketAddress_PortValue{PortValue: target.port}
			changed = true
		}
	}
	return changed
}
