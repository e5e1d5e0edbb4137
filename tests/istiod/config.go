package main

// Reading the input files: Istio resources (every schema istiod knows) and the few Kubernetes
// objects a local mesh needs (Service, Pod, Namespace). istiod's in-memory store skips
// validation, so each Istio object goes through its schema's own ValidateConfig here, as the
// validating webhook would, and the first refusal names the object: `<file>: <Kind>
// <namespace>/<name>: <reason>`.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubeyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	networking "istio.io/api/networking/v1alpha3"

	"istio.io/istio/pilot/pkg/config/kube/crd"
	"istio.io/istio/pkg/config"
	"istio.io/istio/pkg/config/schema/collections"
	"istio.io/istio/pkg/config/schema/resource"
	kubelib "istio.io/istio/pkg/kube"
)

// object is one document of the input: an Istio resource or a Kubernetes object.
type object struct {
	file  string
	key   objectKey
	istio *config.Config
	kube  runtime.Object
	// What decides whether an update is needed: the document's spec and metadata as JSON.
	fingerprint string
}

type objectKey struct {
	apiVersion, kind, namespace, name string
}

func (k objectKey) String() string {
	if k.namespace == "" {
		return fmt.Sprintf("%s %s", k.kind, k.name)
	}
	return fmt.Sprintf("%s %s/%s", k.kind, k.namespace, k.name)
}

// loadFiles reads and validates every document of the files, in order. Warnings of Istio's
// validation go to warn.
func loadFiles(files []string, warn func(string)) ([]object, error) {
	var out []object
	seen := map[objectKey]string{}
	for _, file := range files {
		objects, err := loadFile(file, warn)
		if err != nil {
			return nil, err
		}
		for _, o := range objects {
			if other, dup := seen[o.key]; dup {
				return nil, fmt.Errorf("%s: %s: defined twice (also in %s)", file, o.key, other)
			}
			seen[o.key] = file
			out = append(out, o)
		}
	}
	return out, nil
}

func loadFile(file string, warn func(string)) ([]object, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	reader := kubeyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []object
	for n := 1; ; n++ {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %v", file, n, err)
		}
		o, err := parseDocument(doc, warn)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", file, err)
		}
		if o != nil {
			o.file = file
			out = append(out, *o)
		}
	}
}

// parseDocument returns nil for an empty document (comments only).
func parseDocument(doc []byte, warn func(string)) (*object, error) {
	var raw map[string]any
	if err := yaml.Unmarshal(doc, &raw); err != nil {
		return nil, fmt.Errorf("not YAML: %v", err)
	}
	if len(raw) == 0 {
		return nil, nil
	}
	var obj crd.IstioKind
	if err := yaml.Unmarshal(doc, &obj); err != nil {
		return nil, fmt.Errorf("%v", err)
	}
	key := objectKey{apiVersion: obj.APIVersion, kind: obj.Kind, namespace: obj.Namespace, name: obj.Name}
	if obj.Kind == "" || obj.APIVersion == "" {
		return nil, fmt.Errorf("%s: apiVersion and kind are required", key)
	}
	if obj.Name == "" {
		return nil, fmt.Errorf("%s: metadata.name is required", key)
	}
	fingerprint, _ := json.Marshal(raw)
	gvk := obj.GroupVersionKind()
	if s, ok := collections.PilotGatewayAPI().FindByGroupVersionAliasesKind(resource.FromKubernetesGVK(&gvk)); ok {
		if !s.IsClusterScoped() && obj.Namespace == "" {
			obj.Namespace = "default" // as kubectl applies it
			key.namespace = obj.Namespace
		}
		cfg, err := crd.ConvertObject(s, &obj, "cluster.local")
		if err != nil {
			return nil, fmt.Errorf("%s: %v", key, err)
		}
		warning, err := s.ValidateConfig(*cfg)
		if err != nil {
			return nil, fmt.Errorf("%s: %s", key, oneLine(err))
		}
		if warning != nil {
			warn(fmt.Sprintf("%s: warning: %v", key, warning))
		}
		return &object{key: key, istio: cfg, fingerprint: string(fingerprint)}, nil
	}
	switch gvk.GroupVersion().String() + "/" + gvk.Kind {
	case "v1/Service", "v1/Pod", "v1/Namespace":
	default:
		return nil, fmt.Errorf("%s: not an Istio resource, and of the Kubernetes objects only v1 Service, "+
			"Pod and Namespace are read", key)
	}
	decoded, _, err := kubelib.IstioCodec.UniversalDeserializer().Decode(doc, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", key, err)
	}
	switch o := decoded.(type) {
	case *corev1.Service:
		if o.Namespace == "" {
			o.Namespace = "default"
		}
		if len(o.Spec.Ports) == 0 {
			return nil, fmt.Errorf("%s: spec.ports: a Service needs at least one port", key)
		}
		key.namespace = o.Namespace
	case *corev1.Pod:
		if o.Namespace == "" {
			o.Namespace = "default"
		}
		key.namespace = o.Namespace
	case *corev1.Namespace:
	}
	return &object{key: key, kube: decoded, fingerprint: string(fingerprint)}, nil
}

// oneLine turns Istio's multi-error text ("2 errors occurred:\n\t* a\n\t* b") into "a; b".
func oneLine(err error) string {
	var parts []string
	for _, line := range strings.Split(err.Error(), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasSuffix(line, "occurred:") {
			continue
		}
		parts = append(parts, strings.TrimPrefix(line, "* "))
	}
	return strings.Join(parts, "; ")
}

// summary counts the objects by kind, for log lines.
func summary(objects []object) string {
	counts := map[string]int{}
	for _, o := range objects {
		counts[o.key.kind]++
	}
	kinds := make([]string, 0, len(counts))
	for k := range counts {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	parts := make([]string, 0, len(kinds))
	for _, k := range kinds {
		parts = append(parts, fmt.Sprintf("%d %s", counts[k], k))
	}
	return strings.Join(parts, ", ")
}

// hosts: `istiod-local hosts FILE...` prints the hosts of every MESH_EXTERNAL ServiceEntry (the
// providers, in what `render istio` makes), one per line, for the mocks that stand in for them.
func hosts(args []string) error {
	objects, err := loadFiles(args, func(string) {})
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, o := range objects {
		if o.istio == nil || o.key.kind != "ServiceEntry" {
			continue
		}
		se, ok := o.istio.Spec.(*networking.ServiceEntry)
		if !ok || se.GetLocation() != networking.ServiceEntry_MESH_EXTERNAL {
			continue
		}
		for _, h := range se.GetHosts() {
			if !seen[h] {
				seen[h] = true
				fmt.Println(h)
			}
		}
	}
	return nil
}

// validate: `istiod-local validate FILE...` checks files as serve would and prints a summary.
func validate(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: istiod-local validate FILE...")
	}
	objects, err := loadFiles(args, func(w string) { fmt.Fprintln(os.Stderr, w) })
	if err != nil {
		return err
	}
	fmt.Printf("valid: %s\n", summary(objects))
	return nil
}
