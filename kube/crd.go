package kube

// This file watches shardlb's configuration objects (API group shardlb.io, package
// api/v1alpha1) and applies them live: on every change of an object, of a BGP
// password Secret or of this node's labels, config.Build combines them with the
// flags and the result goes to ObjectsDeps.Apply (the speaker's SetPeers). Every
// object gets an Accepted condition; a refusal is also a Warning Event on it.
//
// Objects are read with the dynamic client and converted to the typed structs at the
// informer boundary (the Transform), as the slim informers of the rest of the
// package do: no generated clientset, no informer factory.
//
// Every pod computes the same verdicts (config.Build is deterministic and only the
// peers depend on the node), so every pod may write status. A pod writes only a
// condition that differs from what it sees, with the resourceVersion it saw: the
// first write wins, the others get a conflict and then see the condition written.
// Only the pod whose write succeeded records the Event, so a refusal is told once,
// not once per node.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/shardlb/shardlb/api/v1alpha1"
	"github.com/shardlb/shardlb/config"
)

// ObjectsDeps is what WatchObjects needs besides Config.
type ObjectsDeps struct {
	Logger *slog.Logger
	// Flags is the configuration the flags give; objects add to it.
	Flags config.Flags
	// Apply applies one node's desired configuration. It is called after every
	// change, with the whole configuration, and must be declarative. An error is
	// logged and the same configuration applied again after RetryAfter.
	Apply func(ctx context.Context, d config.Desired) error
	// RetryAfter is the pause before retrying a failed Apply, and between checks
	// for the CRDs when they are not installed; 0 is 10 s.
	RetryAfter time.Duration
}

// eventObjectAccepted is the reason of the Normal Event on an object accepted; a
// refusal's Warning Event has the condition's reason.
const eventObjectAccepted = "Accepted"

// notSupported are the object kinds this release validates and reports on but does
// not apply: a valid one is refused with ReasonNotSupported, so nobody takes it as
// working. Every kind is applied today (IPPools by the controller, pool.go).
var notSupported = map[config.Kind]string{}

// objectKinds maps each kind to its resource.
var objectKinds = []struct {
	kind config.Kind
	gvr  schema.GroupVersionResource
	obj  func() runtime.Object
}{
	{config.KindIPPool, v1alpha1.IPPools, func() runtime.Object { return &v1alpha1.IPPool{} }},
	{config.KindBGPPeer, v1alpha1.BGPPeers, func() runtime.Object { return &v1alpha1.BGPPeer{} }},
	{config.KindBFDProfile, v1alpha1.BFDProfiles, func() runtime.Object { return &v1alpha1.BFDProfile{} }},
	{config.KindBGPAdvertisement, v1alpha1.BGPAdvertisements, func() runtime.Object { return &v1alpha1.BGPAdvertisement{} }},
}

// WatchObjects applies the configuration objects live until ctx ends. Without the
// CRDs installed it applies the flags alone and checks again every RetryAfter.
func WatchObjects(ctx context.Context, cfg Config, deps ObjectsDeps) error {
	if cfg.NodeName == "" || cfg.Namespace == "" {
		return errors.New("watch objects: node name and namespace are required")
	}
	if deps.Apply == nil {
		return errors.New("watch objects: no Apply")
	}
	log := deps.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	retry := deps.RetryAfter
	if retry == 0 {
		retry = 10 * time.Second
	}
	rc, err := cfg.restConfig()
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("kube client: %w", err)
	}
	w := &objectWatcher{cfg: &cfg, deps: deps, log: log, dyn: dyn, retry: retry, kick: make(chan struct{}, 1)}

	// Until the CRDs are there, the flags alone.
	for first := true; !installed(client); first = false {
		if first {
			if err := w.applyFlags(ctx); err != nil {
				log.Error("apply configuration from flags", "err", err)
			}
			log.Info("shardlb.io CRDs not installed: configuration from flags only; checking again", "every", retry)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(retry):
		}
	}

	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	defer broadcaster.Shutdown()
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	w.recorder = broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "shardlb", Host: cfg.NodeName})

	handler := cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { w.poke() }, UpdateFunc: func(_, _ any) { w.poke() }, DeleteFunc: func(any) { w.poke() },
	}
	var informers []cache.Controller
	w.stores = make(map[config.Kind]cache.Store)
	for _, k := range objectKinds {
		store, inf := cache.NewInformerWithOptions(cache.InformerOptions{
			ListerWatcher: dynamicListWatch(dyn.Resource(k.gvr)),
			ObjectType:    &unstructured.Unstructured{},
			Transform:     typedTransform(k.obj),
			Handler:       handler,
		})
		w.stores[k.kind] = store
		informers = append(informers, inf)
	}
	// BGP passwords: only Secrets of type basic-auth in shardlb's namespace, and only
	// where the RBAC allows it (the default manifests do not).
	var synced []cache.InformerSynced
	var inf cache.Controller
	w.noSecrets = !mayWatchSecrets(ctx, client, cfg.Namespace)
	if w.noSecrets {
		log.Info("shardlb may not read Secrets in its namespace: BGPPeer passwordSecret is refused", "namespace", cfg.Namespace)
	} else {
		w.secrets, inf = cache.NewInformerWithOptions(cache.InformerOptions{
			ListerWatcher: cache.NewListWatchFromClient(client.CoreV1().RESTClient(), "secrets", cfg.Namespace, fields.OneTermEqualSelector("type", string(corev1.SecretTypeBasicAuth))),
			ObjectType:    &corev1.Secret{},
			Transform:     secretPassword,
			Handler:       handler,
		})
		informers = append(informers, inf)
	}
	// This node's labels, for the peers' nodeSelectors.
	w.nodes, inf = cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: cache.NewListWatchFromClient(client.CoreV1().RESTClient(), "nodes", corev1.NamespaceAll, fields.OneTermEqualSelector("metadata.name", cfg.NodeName)),
		ObjectType:    &corev1.Node{},
		Transform:     nodeLabels,
		Handler:       handler,
	})

	informCtx, stop := context.WithCancel(ctx)
	defer stop()
	for _, inf := range informers {
		go inf.Run(informCtx.Done())
		synced = append(synced, inf.HasSynced)
	}
	go inf.Run(informCtx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil
	}
	// The Node is waited for a while only: without it (or the RBAC to read it) the
	// peers with nodeSelectors are left out, as on a node without labels, and
	// added when it shows.
	nodeCtx, nodeCancel := context.WithTimeout(ctx, 10*time.Second)
	if !cache.WaitForCacheSync(nodeCtx.Done(), inf.HasSynced) {
		log.Warn("this node's Node object not read in time: peers with nodeSelectors wait for it", "node", cfg.NodeName)
	}
	nodeCancel()
	log.Info("configuration objects watched", "node", cfg.NodeName)
	w.run(ctx)
	return nil
}

// mayWatchSecrets asks the API whether this pod may list and watch Secrets in ns.
func mayWatchSecrets(ctx context.Context, client kubernetes.Interface, ns string) bool {
	for _, verb := range []string{"list", "watch"} {
		r, err := client.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authorizationv1.SelfSubjectAccessReview{
			Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: verb, Resource: "secrets", Namespace: ns,
			}},
		}, metav1.CreateOptions{})
		if err != nil || !r.Status.Allowed {
			return false
		}
	}
	return true
}

// installed reports whether the API serves shardlb.io/v1alpha1.
func installed(client kubernetes.Interface) bool {
	_, err := client.Discovery().ServerResourcesForGroupVersion(v1alpha1.GroupVersion.String())
	return err == nil
}

func dynamicListWatch(r dynamic.NamespaceableResourceInterface) *cache.ListWatch {
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return r.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return r.Watch(ctx, o)
		},
	}
}

// typedTransform converts an object from the dynamic client to its Go type. An
// object the type cannot hold (the API validated it against the schema, so only a
// CRD of another version could) is kept as it is and refused later.
func typedTransform(newObj func() runtime.Object) cache.TransformFunc {
	return func(obj any) (any, error) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			return t, nil
		}
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			return obj, nil
		}
		out := newObj()
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, out); err != nil {
			return obj, nil
		}
		if m, ok := out.(metav1.Object); ok {
			m.SetManagedFields(nil)
		}
		return out, nil
	}
}

// secretPassword keeps a Secret's name and password only.
type secretPw struct {
	metav1.ObjectMeta
	password string
	ok       bool
}

func secretPassword(obj any) (any, error) {
	s, ok := obj.(*corev1.Secret)
	if !ok {
		return obj, nil
	}
	pw, has := s.Data[corev1.BasicAuthPasswordKey]
	return &secretPw{ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace, ResourceVersion: s.ResourceVersion}, password: string(pw), ok: has}, nil
}

type nodeLabelSet struct {
	metav1.ObjectMeta
}

func nodeLabels(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	return &nodeLabelSet{ObjectMeta: metav1.ObjectMeta{Name: n.Name, ResourceVersion: n.ResourceVersion, Labels: n.Labels}}, nil
}

type objectWatcher struct {
	cfg      *Config
	deps     ObjectsDeps
	log      *slog.Logger
	dyn      dynamic.Interface
	retry    time.Duration
	recorder record.EventRecorder
	stores   map[config.Kind]cache.Store
	secrets  cache.Store // nil with noSecrets
	// noSecrets: the RBAC grants no list and watch on Secrets.
	noSecrets bool
	nodes     cache.Store
	kick      chan struct{}
}

func (w *objectWatcher) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

func (w *objectWatcher) applyFlags(ctx context.Context) error {
	d, _ := config.Build(w.deps.Flags, config.Objects{}, config.Node{Name: w.cfg.NodeName})
	return w.deps.Apply(ctx, d)
}

// run rebuilds and applies the configuration on every change, retrying a failed
// apply.
func (w *objectWatcher) run(ctx context.Context) {
	var retry <-chan time.Time
	// applied is the configuration last applied without error: a change of the Node
	// or a Secret that changes nothing is not applied again.
	var applied *config.Desired
	w.poke()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
		case <-retry:
		}
		retry = nil
		objs, node := w.snapshot()
		d, verdicts := config.Build(w.deps.Flags, objs, node)
		if applied == nil || !reflect.DeepEqual(*applied, d) {
			applied = nil
			if err := w.deps.Apply(ctx, d); err != nil {
				w.log.Error("apply configuration objects", "err", err)
				retry = time.After(w.retry)
			} else {
				applied = &d
			}
		}
		w.report(ctx, verdicts)
	}
}

func (w *objectWatcher) snapshot() (config.Objects, config.Node) {
	objs := config.Objects{Namespace: w.cfg.Namespace, Passwords: map[string]string{}, NoSecretAccess: w.noSecrets}
	for _, o := range w.stores[config.KindIPPool].List() {
		if p, ok := o.(*v1alpha1.IPPool); ok {
			objs.Pools = append(objs.Pools, *p)
		}
	}
	for _, o := range w.stores[config.KindBGPPeer].List() {
		if p, ok := o.(*v1alpha1.BGPPeer); ok {
			objs.Peers = append(objs.Peers, *p)
		}
	}
	for _, o := range w.stores[config.KindBFDProfile].List() {
		if p, ok := o.(*v1alpha1.BFDProfile); ok {
			objs.BFDProfiles = append(objs.BFDProfiles, *p)
		}
	}
	for _, o := range w.stores[config.KindBGPAdvertisement].List() {
		if p, ok := o.(*v1alpha1.BGPAdvertisement); ok {
			objs.Advertisements = append(objs.Advertisements, *p)
		}
	}
	if w.secrets != nil {
		for _, o := range w.secrets.List() {
			if s, ok := o.(*secretPw); ok && s.ok {
				objs.Passwords[s.Name] = s.password
			}
		}
	}
	node := config.Node{Name: w.cfg.NodeName}
	if o, ok, _ := w.nodes.GetByKey(w.cfg.NodeName); ok {
		if n, ok := o.(*nodeLabelSet); ok {
			node.Labels = n.Labels
		}
	}
	return objs, node
}

// report writes each object's Accepted condition where it differs from what the
// object shows, and records a Warning Event for a refusal this pod wrote.
func (w *objectWatcher) report(ctx context.Context, verdicts []config.Verdict) {
	for _, v := range verdicts {
		if msg, ok := notSupported[v.Kind]; ok && v.Accepted {
			v.Accepted, v.Reason, v.Message = false, v1alpha1.ReasonNotSupported, msg
		}
		o, ok, _ := w.stores[v.Kind].GetByKey(v.Name)
		if !ok {
			continue
		}
		if adv, ok := o.(*v1alpha1.BGPAdvertisement); ok && v.Accepted {
			if msg := config.Unapplied(adv.Spec); msg != "" {
				v.Accepted, v.Reason, v.Message = false, v1alpha1.ReasonNotSupported, msg
			}
		}
		var gvr schema.GroupVersionResource
		for _, k := range objectKinds {
			if k.kind == v.Kind {
				gvr = k.gvr
			}
		}
		obj, ok := o.(metav1.Object)
		if !ok {
			continue
		}
		cond := metav1.Condition{Type: v1alpha1.ConditionAccepted, Status: metav1.ConditionTrue, Reason: v.Reason, Message: v.Message, ObservedGeneration: v.Generation}
		if !v.Accepted {
			cond.Status = metav1.ConditionFalse
		}
		conds := conditionsOf(o)
		if cur := meta.FindStatusCondition(conds, cond.Type); cur != nil && cur.Status == cond.Status && cur.Reason == cond.Reason &&
			cur.Message == cond.Message && cur.ObservedGeneration == cond.ObservedGeneration {
			continue
		}
		meta.SetStatusCondition(&conds, cond)
		u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(o)
		if err != nil {
			continue
		}
		if err := unstructured.SetNestedSlice(u, conditionsAsSlice(conds), "status", "conditions"); err != nil {
			continue
		}
		uo := &unstructured.Unstructured{Object: u}
		uo.SetAPIVersion(v1alpha1.GroupVersion.String())
		uo.SetKind(string(v.Kind))
		_, err = w.dyn.Resource(gvr).UpdateStatus(ctx, uo, metav1.UpdateOptions{FieldManager: "shardlb"})
		switch {
		case apierrors.IsConflict(err) || apierrors.IsNotFound(err):
			// Another pod wrote first (it tells the Event), or the object is gone.
			continue
		case err != nil:
			w.log.Warn("write status", "kind", v.Kind, "name", v.Name, "err", err)
			continue
		}
		ref := &corev1.ObjectReference{APIVersion: v1alpha1.GroupVersion.String(), Kind: string(v.Kind), Name: obj.GetName(), UID: obj.GetUID(), ResourceVersion: obj.GetResourceVersion()}
		if v.Accepted {
			w.log.Info("configuration object accepted", "kind", v.Kind, "name", v.Name)
			w.recorder.Event(ref, corev1.EventTypeNormal, eventObjectAccepted, fmt.Sprintf("%s %s accepted", v.Kind, v.Name))
		} else {
			w.log.Warn("configuration object refused", "kind", v.Kind, "name", v.Name, "reason", v.Reason, "message", v.Message)
			w.recorder.Event(ref, corev1.EventTypeWarning, v.Reason, v.Message)
		}
	}
}

func conditionsOf(o any) []metav1.Condition {
	var st v1alpha1.Status
	switch x := o.(type) {
	case *v1alpha1.IPPool:
		st.Conditions = x.Status.Conditions
	case *v1alpha1.BGPPeer:
		st = x.Status
	case *v1alpha1.BFDProfile:
		st = x.Status
	case *v1alpha1.BGPAdvertisement:
		st = x.Status
	}
	return slices.Clone(st.Conditions)
}

func conditionsAsSlice(conds []metav1.Condition) []any {
	out := make([]any, 0, len(conds))
	for i := range conds {
		u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&conds[i])
		if err == nil {
			out = append(out, u)
		}
	}
	return out
}
