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

// removalTimeout bounds the reads of one removal check.
const removalTimeout = 2 * time.Second

// removalCheck tells, at a stop, whether this pod is removed for good rather than
// restarted. A pod is removed for good when the DaemonSet that owns it is gone, is
// being deleted, or is another one of the same name (deleted and created again), or
// when the apiserver now refuses what it allowed at the start: the pod's credentials
// (its ServiceAccount deleted) or the reads (its RBAC deleted; an uninstall with
// kubectl delete -k deletes both before the DaemonSet). A pod deleted while its
// DaemonSet stays (a rollout, kubectl delete pod) is replaced by it: a restart.
type removalCheck struct {
	client    kubernetes.Interface
	namespace string
	pod       string
	// readable: the start's check read the pod and its DaemonSet, so a refusal at
	// the stop means the permissions were taken away since.
	readable bool
}

// start checks that the pod and its DaemonSet can be read, so that a refusal at the
// stop says something. The error says why not, for a warning.
func (r *removalCheck) start(ctx context.Context) error {
	if r.pod == "" {
		return nil
	}
	_, err := r.check(ctx)
	r.readable = err == nil
	return err
}

// removal tells why the pod is removed for good, "" when it is not or when that
// cannot be told (no pod name, reads never allowed, the apiserver unreachable; the
// error then says why, and the stop is what Config.StopMode says).
func (r *removalCheck) removal(ctx context.Context) (string, error) {
	if r.pod == "" {
		return "", nil
	}
	why, err := r.check(ctx)
	switch {
	case apierrors.IsUnauthorized(err):
		// A restart never revokes the pod's credentials.
		return "this pod's credentials are refused (its ServiceAccount deleted)", nil
	case apierrors.IsForbidden(err) && r.readable:
		return "this pod may no longer read itself or its DaemonSet (its RBAC deleted)", nil
	}
	return why, err
}

// check reads the pod and the DaemonSet that owns it.
func (r *removalCheck) check(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, removalTimeout)
	defer cancel()
	pod, err := r.client.CoreV1().Pods(r.namespace).Get(ctx, r.pod, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("read pod %s/%s: %w", r.namespace, r.pod, err)
	}
	owner := metav1.GetControllerOf(pod)
	if owner == nil || owner.Kind != "DaemonSet" || owner.APIVersion != "apps/v1" {
		return "", nil
	}
	ds, err := r.client.AppsV1().DaemonSets(r.namespace).Get(ctx, owner.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return fmt.Sprintf("DaemonSet %s/%s deleted", r.namespace, owner.Name), nil
	case err != nil:
		return "", fmt.Errorf("read DaemonSet %s/%s: %w", r.namespace, owner.Name, err)
	case ds.UID != owner.UID:
		return fmt.Sprintf("DaemonSet %s/%s deleted (another of that name now)", r.namespace, owner.Name), nil
	case ds.DeletionTimestamp != nil:
		return fmt.Sprintf("DaemonSet %s/%s being deleted", r.namespace, owner.Name), nil
	}
	return "", nil
}
