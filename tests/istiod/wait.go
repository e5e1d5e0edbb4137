package main

// wait: a proxy has its configuration when Envoy is LIVE (its initial LDS/CDS applied and its
// listeners warmed, which includes every ECDS filter a listener waits for), no listener is
// still warming, and every ECDS subscription got a config. (A proxy may have no listener at
// all: a gateway that no Gateway resource selects.) A rejected listener, cluster or
// ECDS update fails at once, naming the proxy and quoting Envoy's reason from its log.

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"time"
)

type proxyAdmin struct {
	name, admin, log string
}

func wait(args []string) error {
	fs := flag.NewFlagSet("wait", flag.ContinueOnError)
	var proxies listFlag
	fs.Var(&proxies, "proxy", "NAME=ADMIN_ADDR[,LOG_FILE] (repeatable)")
	timeout := fs.Duration("timeout", 60*time.Second, "how long to wait for all proxies")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if len(proxies) == 0 {
		return errors.New("at least one --proxy is needed")
	}
	var list []proxyAdmin
	for _, p := range proxies {
		name, rest, ok := strings.Cut(p, "=")
		if !ok {
			return fmt.Errorf("--proxy %q: expected NAME=ADMIN_ADDR[,LOG_FILE]", p)
		}
		admin, log, _ := strings.Cut(rest, ",")
		list = append(list, proxyAdmin{name: name, admin: admin, log: log})
	}
	deadline := time.Now().Add(*timeout)
	for _, p := range list {
		for {
			done, err := p.check()
			if err != nil {
				return fmt.Errorf("%s: %v", p.name, err)
			}
			if done == "" {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: not configured after %v: %s", p.name, *timeout, done)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
}

// check returns "" once the proxy is configured, else what it still waits for; an error for a
// rejection.
func (p proxyAdmin) check() (string, error) {
	stats, err := p.stats()
	if err != nil {
		return "admin interface: " + err.Error(), nil
	}
	for _, what := range []struct{ stat, kind, typ string }{
		{"listener_manager.lds.update_rejected", "a listener update", "Listener"},
		{"cluster_manager.cds.update_rejected", "a cluster update", "Cluster"},
	} {
		if stats[what.stat] > 0 {
			return "", fmt.Errorf("rejected %s: %s", what.kind, p.reason(what.typ))
		}
	}
	var ecds []string
	for name, v := range stats {
		if !strings.HasPrefix(name, "extension_config_discovery.") {
			continue
		}
		if strings.HasSuffix(name, ".config_fail") && v > 0 {
			sub := strings.TrimSuffix(name, ".config_fail")
			return "", fmt.Errorf("rejected the ECDS config of %s: %s", sub, p.reason("TypedExtensionConfig"))
		}
		if strings.HasSuffix(name, ".config_reload") {
			ecds = append(ecds, strings.TrimSuffix(name, ".config_reload"))
		}
	}
	sort.Strings(ecds)
	for _, sub := range ecds {
		if stats[sub+".config_reload"] == 0 {
			return "the ECDS config of " + sub, nil
		}
	}
	if stats["listener_manager.lds.update_success"] == 0 || stats["cluster_manager.cds.update_success"] == 0 {
		return "its first LDS and CDS responses", nil
	}
	if n := stats["listener_manager.total_listeners_warming"]; n > 0 {
		return fmt.Sprintf("%d listener(s) warming", n), nil
	}
	body, err := p.get("/ready")
	if err != nil || strings.TrimSpace(body) != "LIVE" {
		return "server state LIVE", nil
	}
	return "", nil
}

func (p proxyAdmin) get(path string) (string, error) {
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + p.admin + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}

func (p proxyAdmin) stats() (map[string]uint64, error) {
	body, err := p.get("/stats?format=json")
	if err != nil {
		return nil, err
	}
	var doc struct {
		Stats []struct {
			Name  string          `json:"name"`
			Value json.RawMessage `json:"value"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for _, s := range doc.Stats {
		var v uint64
		if json.Unmarshal(s.Value, &v) == nil {
			out[s.Name] = v
		}
	}
	return out, nil
}

// reason: Envoy's own words from its log ("gRPC config for ... rejected: ..."), if a log is known.
func (p proxyAdmin) reason(typ string) string {
	if p.log == "" {
		return "see the proxy's log"
	}
	data, err := os.ReadFile(p.log)
	if err != nil {
		return "see " + p.log
	}
	var lines []string
	for _, l := range strings.Split(string(data), "\n") {
		if strings.Contains(l, "rejected") && strings.Contains(l, typ) {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	if len(lines) == 0 {
		return "see " + p.log
	}
	return lines[len(lines)-1]
}
