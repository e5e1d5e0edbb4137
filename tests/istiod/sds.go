package main

// SDS for the proxies: istio-agent's own SDS server (security/pkg/nodeagent/sds) and secret
// cache, serving files only (istio-agent's "file mounted certificates" mode). A DestinationRule with `tls.mode: SIMPLE` and no caCertificates makes
// istiod point the cluster's validation context at the SDS secret `file-root:system` on the
// `sds-grpc` cluster; istio-agent answers it from the OS CA bundle, and here from --ca (the
// mock providers' CA). Using Istio's server rather than a minimal one keeps the secret's shape
// (a validation context with the bundle inline) exactly what istio-agent sends.
//
// istiod also gives the proxies mTLS settings for in-mesh services (auto mTLS), which refer to
// the workload certificate `default` and the mesh root `ROOTCA`. istio-agent would get them
// from istiod's CA; here a throw-away mesh CA made at start signs one workload certificate
// (spiffe://cluster.local/ns/default/sa/default), kept in ROOT/etc/certs as a file-mounted
// certificate would be.

import (
	"fmt"
	"os"
	"path/filepath"

	"time"

	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/nodeagent/cache"
	"istio.io/istio/security/pkg/nodeagent/sds"
	pkiutil "istio.io/istio/security/pkg/pki/util"
)

// serveSDS listens on ROOT/var/run/secrets/workload-spiffe-uds/socket (istio-agent's socket,
// relative to the proxy's working directory, which is ROOT for the proxies).
func serveSDS(root, ca string) (func(), error) {
	if _, err := os.Stat(ca); err != nil {
		return nil, fmt.Errorf("--ca: %v", err)
	}
	if err := os.MkdirAll(filepath.Join(root, security.WorkloadIdentityPath), 0o755); err != nil {
		return nil, err
	}
	if err := os.Chdir(root); err != nil {
		return nil, err
	}
	certs, err := meshCertificates(filepath.Join(root, "etc/certs"))
	if err != nil {
		return nil, fmt.Errorf("mesh certificates: %v", err)
	}
	options := &security.Options{
		CARootPath: ca,
		// No CA client: the workload certificate is a file (see meshCertificates).
		FileMountedCerts:  true,
		CertChainFilePath: certs.chain,
		KeyFilePath:       certs.key,
		RootCertFilePath:  certs.root,
	}
	secrets, err := cache.NewSecretManagerClient(nil, options)
	if err != nil {
		return nil, err
	}
	server := sds.NewServer(options, secrets, nil)
	secrets.RegisterSecretHandler(server.OnSecretUpdate)
	return func() {
		server.Stop()
		secrets.Close()
	}, nil
}

// sdsSocket is where serveSDS listens, for the bootstrap.
func sdsSocket(root string) string {
	return filepath.Join(root, security.GetIstioSDSServerSocketPath())
}

type certFiles struct{ root, chain, key string }

// meshCertificates writes a new mesh root and a workload certificate signed by it into dir.
func meshCertificates(dir string) (certFiles, error) {
	files := certFiles{
		root:  filepath.Join(dir, "root-cert.pem"),
		chain: filepath.Join(dir, "cert-chain.pem"),
		key:   filepath.Join(dir, "key.pem"),
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return files, err
	}
	rootPEM, rootKeyPEM, err := pkiutil.GenCertKeyFromOptions(pkiutil.CertOptions{
		Host: "cluster.local", Org: "istiod-local", IsCA: true, IsSelfSigned: true,
		TTL: 30 * 24 * time.Hour, ECSigAlg: pkiutil.EcdsaSigAlg,
	})
	if err != nil {
		return files, err
	}
	rootCert, err := pkiutil.ParsePemEncodedCertificate(rootPEM)
	if err != nil {
		return files, err
	}
	rootKey, err := pkiutil.ParsePemEncodedKey(rootKeyPEM)
	if err != nil {
		return files, err
	}
	certPEM, keyPEM, err := pkiutil.GenCertKeyFromOptions(pkiutil.CertOptions{
		Host: "spiffe://cluster.local/ns/default/sa/default", SignerCert: rootCert, SignerPriv: rootKey,
		TTL: 30 * 24 * time.Hour, IsDualUse: false, IsServer: true, IsClient: true,
		ECSigAlg: pkiutil.EcdsaSigAlg,
	})
	if err != nil {
		return files, err
	}
	for path, data := range map[string][]byte{files.root: rootPEM, files.chain: certPEM, files.key: keyPEM} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return files, err
		}
	}
	return files, nil
}
