package main

// The Kubernetes objects of a reload go through the fake Kubernetes client, as an API server's
// watch would deliver them to istiod's Kubernetes registry.

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
)

func applyKube(ctx context.Context, kube typedcorev1.CoreV1Interface, obj runtime.Object, exists bool) error {
	var err error
	switch o := obj.(type) {
	case *corev1.Service:
		if exists {
			var cur *corev1.Service
			if cur, err = kube.Services(o.Namespace).Get(ctx, o.Name, metav1.GetOptions{}); err == nil {
				o.ResourceVersion = cur.ResourceVersion
				_, err = kube.Services(o.Namespace).Update(ctx, o, metav1.UpdateOptions{})
			}
		} else {
			_, err = kube.Services(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		}
	case *corev1.Pod:
		if exists {
			var cur *corev1.Pod
			if cur, err = kube.Pods(o.Namespace).Get(ctx, o.Name, metav1.GetOptions{}); err == nil {
				o.ResourceVersion = cur.ResourceVersion
				_, err = kube.Pods(o.Namespace).Update(ctx, o, metav1.UpdateOptions{})
			}
		} else {
			_, err = kube.Pods(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		}
	case *corev1.Namespace:
		if exists {
			_, err = kube.Namespaces().Update(ctx, o, metav1.UpdateOptions{})
		} else {
			_, err = kube.Namespaces().Create(ctx, o, metav1.CreateOptions{})
		}
	default:
		err = fmt.Errorf("unsupported Kubernetes object %T", obj)
	}
	return err
}

func deleteKube(ctx context.Context, kube typedcorev1.CoreV1Interface, obj runtime.Object) error {
	switch o := obj.(type) {
	case *corev1.Service:
		return kube.Services(o.Namespace).Delete(ctx, o.Name, metav1.DeleteOptions{})
	case *corev1.Pod:
		return kube.Pods(o.Namespace).Delete(ctx, o.Name, metav1.DeleteOptions{})
	case *corev1.Namespace:
		return kube.Namespaces().Delete(ctx, o.Name, metav1.DeleteOptions{})
	}
	return fmt.Errorf("unsupported Kubernetes object %T", obj)
}
