package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	meshconfig "istio.io/api/mesh/v1alpha1"
	"istio.io/istio/pilot/pkg/model"
	v3 "istio.io/istio/pilot/pkg/xds/v3"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/config"
	"istio.io/istio/pkg/config/mesh"
	istiolog "istio.io/istio/pkg/log"
	"k8s.io/apimachinery/pkg/runtime"
)

// istiodFeatures are istiod's own feature settings (environment variables, read when its packages
// initialise) that keep istio-proxy-only extensions out of what it generates, so that upstream
// Envoy accepts the configuration:
//   - PILOT_ENABLE_ALPN_FILTER=false: no `istio.alpn` HTTP filter (istio-proxy's ALPN override
//     for mTLS clusters);
//   - PILOT_ENABLE_METADATA_EXCHANGE=false: no `istio.metadata_exchange` network filter and no
//     `io.istio.http.peer_metadata` HTTP filter (peer identity exchange for telemetry).
//
// The third one is mesh configuration rather than a feature: no Istio stats provider
// (`defaultProviders.metrics` empty, so no `istio.stats` filter); see meshConfig.
var istiodFeatures = map[string]string{
	"PILOT_ENABLE_ALPN_FILTER":       "false",
	"PILOT_ENABLE_METADATA_EXCHANGE": "false",
}

// withFeatures re-executes this program with istiodFeatures in its environment unless they are
// there already (istiod reads them at package initialisation, before main).
func withFeatures() error {
	missing := false
	for k, v := range istiodFeatures {
		if os.Getenv(k) != v {
			missing = true
			if err := os.Setenv(k, v); err != nil {
				return err
			}
		}
	}
	if !missing {
		return nil
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	return syscall.Exec(exe, os.Args, os.Environ())
}

// defaultAccessLogFormat: Istio's access log fields that matter here, plus the filter's own
// (the provider chosen and the providers tried).
const defaultAccessLogFormat = `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" ` +
	`%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% authority=%REQ(:AUTHORITY)% ` +
	`cluster=%UPSTREAM_CLUSTER_RAW% upstream=%UPSTREAM_HOST% downstream=%DOWNSTREAM_REMOTE_ADDRESS% ` +
	`provider=%FILTER_STATE(wasm.llm.provider:PLAIN)% attempts=%FILTER_STATE(wasm.llm.attempts:PLAIN)%` + "\n"

// meshConfig: Istio's default mesh configuration (what a default install's istiod starts from),
// with no stats provider (istio.stats is istio-proxy's), no tracing (no collector here) and an
// access log on each proxy's stdout. A --mesh-config file is applied over it.
func meshConfig(file string) (*meshconfig.MeshConfig, error) {
	m := mesh.DefaultMeshConfig()
	m.DefaultProviders = &meshconfig.MeshConfig_DefaultProviders{}
	m.EnableTracing = false
	m.AccessLogFile = "/dev/stdout"
	m.AccessLogFormat = defaultAccessLogFormat
	if file == "" {
		return m, nil
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	merged, err := mesh.ApplyMeshConfig(string(data), m)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", file, err)
	}
	return merged, nil
}

type serveOptions struct {
	listen, admin, ca, root, addresses, meshConfig string
	configs, endpoints                             listFlag
}

func serve(args []string) error {
	var o serveOptions
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.StringVar(&o.listen, "listen", "127.0.0.1:0", "ADS (gRPC) listen address")
	fs.StringVar(&o.admin, "admin", "127.0.0.1:0", "HTTP admin address: GET /ready, POST /reload, istiod's /debug/...")
	fs.Var(&o.configs, "config", "Istio YAML file (repeatable): Istio resources and Kubernetes Service/Pod/Namespace objects")
	fs.StringVar(&o.ca, "ca", "", "PEM bundle served as the SDS secret file-root:system (DestinationRule TLS without caCertificates)")
	fs.StringVar(&o.root, "root", ".", "directory standing for the proxies' /: the SDS socket is ROOT/var/run/secrets/workload-spiffe-uds/socket")
	fs.Var(&o.endpoints, "endpoint", "HOST=IP:PORT (repeatable): clusters sent to the proxies reach HOST at IP:PORT instead")
	fs.StringVar(&o.addresses, "addresses", "", "file to write `xds=IP:PORT` and `admin=IP:PORT` to once serving")
	fs.StringVar(&o.meshConfig, "mesh-config", "", "MeshConfig YAML applied over the defaults")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if len(o.configs) == 0 {
		return errors.New("at least one --config FILE is needed")
	}
	if err := withFeatures(); err != nil {
		return fmt.Errorf("setting istiod's feature environment: %v", err)
	}
	for i, f := range o.configs {
		abs, err := filepath.Abs(f)
		if err != nil {
			return err
		}
		o.configs[i] = abs
	}
	overrides, err := parseEndpoints(o.endpoints)
	if err != nil {
		return err
	}
	m, err := meshConfig(o.meshConfig)
	if err != nil {
		return err
	}
	opts := istiolog.DefaultOptions()
	// The fake server logs every push at info; keep the log to what matters for a local mesh.
	opts.SetDefaultOutputLevel("ads", istiolog.WarnLevel)
	opts.SetDefaultOutputLevel("model", istiolog.WarnLevel)
	if err := istiolog.Configure(opts); err != nil {
		return err
	}

	objects, err := loadFiles(o.configs, logWarning)
	if err != nil {
		return err
	}

	failer := newFailer()
	defer failer.cleanup()
	var istioConfigs []config.Config
	var kubeObjects []runtime.Object
	for _, obj := range objects {
		if obj.istio != nil {
			istioConfigs = append(istioConfigs, *obj.istio)
		} else {
			kubeObjects = append(kubeObjects, obj.kube)
		}
	}
	fake := xds.NewFakeDiscoveryServer(failer, xds.FakeOptions{
		Configs:           istioConfigs,
		KubernetesObjects: kubeObjects,
		MeshConfig:        m,
		// As istiod's default (PILOT_DEBOUNCE_AFTER): the changes of one reload go out as one push.
		DebounceTime: 100 * time.Millisecond,
		ListenerBuilder: func() (net.Listener, error) {
			return net.Listen("tcp", o.listen)
		},
	})
	if len(overrides) > 0 {
		for _, typeURL := range []string{v3.ClusterType} {
			gen, ok := fake.Discovery.Generators[typeURL].(model.XdsDeltaResourceGenerator)
			if !ok {
				return fmt.Errorf("istiod's %s generator does not generate deltas", typeURL)
			}
			fake.Discovery.Generators[typeURL] = &endpointOverride{inner: gen, endpoints: overrides}
		}
	}

	if o.ca != "" {
		ca, err := filepath.Abs(o.ca)
		if err != nil {
			return err
		}
		stop, err := serveSDS(o.root, ca)
		if err != nil {
			return err
		}
		defer stop()
	}

	srv := &server{fake: fake, files: o.configs, current: objects}
	adminListener, err := net.Listen("tcp", o.admin)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ready") })
	mux.HandleFunc("/reload", srv.handleReload)
	mux.Handle("/debug/", fake.DiscoveryDebug)
	go func() { _ = http.Serve(adminListener, mux) }()

	xdsAddr := fake.Listener.Addr().String()
	adminAddr := adminListener.Addr().String()
	logInfo(fmt.Sprintf("serving ADS on %s (admin %s): %s", xdsAddr, adminAddr, summary(objects)))
	if o.addresses != "" {
		tmp := o.addresses + ".tmp"
		text := fmt.Sprintf("xds=%s\nadmin=%s\n", xdsAddr, adminAddr)
		if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp, o.addresses); err != nil {
			return err
		}
	}

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
	for sig := range signals {
		if sig != syscall.SIGHUP {
			logInfo(fmt.Sprintf("%v: stopping", sig))
			return nil
		}
		if msg, err := srv.reload(); err != nil {
			logError(err.Error())
		} else {
			logInfo(msg)
		}
	}
	return nil
}

func logInfo(msg string)    { istiolog.Info(msg) }
func logWarning(msg string) { istiolog.Warn(msg) }
func logError(msg string)   { istiolog.Error(msg) }

// server holds what a reload changes.
type server struct {
	mu      sync.Mutex
	fake    *xds.FakeDiscoveryServer
	files   []string
	current []object
	reloads int
}

// handleReload: POST /reload reads the files again. 200 with a summary when the change went
// out, 422 with the refusal (naming the object) when the new files are invalid: then nothing
// changed.
func (s *server) handleReload(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	msg, err := s.reload()
	if err != nil {
		logError(err.Error())
		http.Error(w, err.Error(), http.StatusUnprocessableEntity)
		return
	}
	logInfo(msg)
	fmt.Fprintln(w, msg)
}

// reload validates the files and, only if all of them are valid, applies the difference to
// istiod's store and Kubernetes registry, then waits until istiod has computed the new push.
func (s *server) reload() (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	next, err := loadFiles(s.files, logWarning)
	if err != nil {
		return "", fmt.Errorf("reload refused, the previous configuration keeps serving: %v", err)
	}
	old := map[objectKey]object{}
	for _, o := range s.current {
		old[o.key] = o
	}
	store := s.fake.Store()
	kube := s.fake.KubeClient().Kube().CoreV1()
	ctx := context.Background()
	var created, updated, deleted int
	for _, o := range next {
		prev, exists := old[o.key]
		delete(old, o.key)
		if exists && prev.fingerprint == o.fingerprint {
			continue
		}
		var err error
		switch {
		case o.istio != nil && exists:
			_, err = store.Update(*o.istio)
			updated++
		case o.istio != nil:
			_, err = store.Create(*o.istio)
			created++
		default:
			err = applyKube(ctx, kube, o.kube, exists)
			if exists {
				updated++
			} else {
				created++
			}
		}
		if err != nil {
			return "", fmt.Errorf("%s: %s: %v", o.file, o.key, err)
		}
	}
	for _, o := range old {
		var err error
		if o.istio != nil {
			err = store.Delete(o.istio.GroupVersionKind, o.istio.Name, o.istio.Namespace, nil)
		} else {
			err = deleteKube(ctx, kube, o.kube)
		}
		if err != nil {
			return "", fmt.Errorf("deleting %s: %v", o.key, err)
		}
		deleted++
	}
	s.current = next
	s.reloads++
	// Wait until istiod has taken every change into a push context (the pushes to the proxies
	// follow asynchronously, as in istiod).
	deadline := time.Now().Add(30 * time.Second)
	time.Sleep(200 * time.Millisecond) // past the debounce
	for s.fake.Discovery.CommittedUpdates.Load() < s.fake.Discovery.InboundUpdates.Load() {
		if time.Now().After(deadline) {
			return "", errors.New("istiod did not take the change within 30 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Sprintf("reload %d: %d created, %d updated, %d deleted (%s)",
		s.reloads, created, updated, deleted, summary(next)), nil
}

// failer is the test.Failer the fake server wants: a fatal error ends the program.
type failer struct {
	mu       sync.Mutex
	cleanups []func()
}

func newFailer() *failer { return &failer{} }

func (f *failer) Fail()            { f.FailNow() }
func (f *failer) FailNow()         { f.Fatal("failed") }
func (f *failer) Helper()          {}
func (f *failer) Skip(args ...any) { f.Fatal(args...) }
func (f *failer) Log(args ...any)  { istiolog.Info(fmt.Sprint(args...)) }
func (f *failer) Logf(format string, args ...any) {
	istiolog.Info(fmt.Sprintf(format, args...))
}

func (f *failer) Fatal(args ...any) {
	fmt.Fprintf(os.Stderr, "istiod-local serve: %s\n", strings.TrimSpace(fmt.Sprintln(args...)))
	f.cleanup()
	os.Exit(1)
}

func (f *failer) Fatalf(format string, args ...any) { f.Fatal(fmt.Sprintf(format, args...)) }

func (f *failer) TempDir() string {
	dir, err := os.MkdirTemp("", "istiod-local")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func (f *failer) Cleanup(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cleanups = append(f.cleanups, fn)
}

func (f *failer) cleanup() {
	f.mu.Lock()
	fns := f.cleanups
	f.cleanups = nil
	f.mu.Unlock()
	for i := len(fns) - 1; i >= 0; i-- {
		fns[i]()
	}
}
