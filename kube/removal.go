package kube

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Stop is what a stop of the process is, as Deps.Stopping is told.
type Stop struct {
	// Restart: the instances, the routes at the routers and the pinned datapath are
	// left for the next process (Config.StopMode).
	Restart bool
	// Removal, when not empty, says why this pod is removed for good: its DaemonSet
	// was deleted (an uninstall). Nothing is left for a next process: the stop hands
	// over and withdraws whatever the StopMode, and the caller removes the pinned
	// datapath too.
	Removal string
}

// removalTimeout bounds the reads removal makes at a stop.
const removalTimeout = 2 * time.Second

// removal tells why pod namespace/name is removed for good, "" when it is not or
// when that cannot be told (no pod name, no RBAC, the apiserver unreachable: the stop
// is then what Config.StopMode says). A pod is removed for good when the DaemonSet
// that owns it is gone, is being deleted, or is another one of the same name (deleted
// and created again), or when the apiserver refuses its credentials (its
// ServiceAccount deleted). A pod deleted while its DaemonSet stays (a rollout, a kubectl
// delete pod) is replaced by the DaemonSet: that is a restart.
func removal(ctx context.Context, client kubernetes.Interface, namespace, name string) (string, error) {
	if name == "" {
		return "", nil
	}
	ctx, cancel := context.WithTimeout(ctx, removalTimeout)
	defer cancel()
	pod, err := client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsUnauthorized(err) {
		// A restart never revokes the pod's credentials; an uninstall that deletes the
		// ServiceAccount before the DaemonSet (kubectl delete -k does) does.
		return "this pod's credentials are refused (its ServiceAccount deleted)", nil
	}
	if err != nil {
		return "", fmt.Errorf("read pod %s/%s: %w", namespace, name, err)
	}
	owner := metav1.GetControllerOf(pod)
	if owner == nil || owner.Kind != "DaemonSet" || owner.APIVersion != "apps/v1" {
		return "", nil
	}
	ds, err := client.AppsV1().DaemonSets(namespace).Get(ctx, owner.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return fmt.Sprintf("DaemonSet %s/%s deleted", namespace, owner.Name), nil
	case err != nil:
		return "", fmt.Errorf("read DaemonSet %s/%s: %w", namespace, owner.Name, err)
	case ds.UID != owner.UID:
		return fmt.Sprintf("DaemonSet %s/%s deleted (another of that name now)", namespace, owner.Name), nil
	case ds.DeletionTimestamp != nil:
		return fmt.Sprintf("DaemonSet %s/%s being deleted", namespace, owner.Name), nil
	}
	return "", nil
}
