package manifest_test

import (
	"context"
	"strings"
	"testing"

	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shardlb/shardlb/manifest"
)

// TestRBACForConfigurationObjects: shardlb may read its configuration objects and
// write their status, and nothing more of them (users own the specs).
func TestRBACForConfigurationObjects(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	for _, f := range []string{"serviceaccount.yaml", "rbac.yaml"} {
		objs, err := manifest.File(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			if _, err := c.resource(t, o).Create(ctx, o, metav1.CreateOptions{}); err != nil {
				t.Fatalf("create %s %s: %v", o.GetKind(), o.GetName(), err)
			}
		}
	}
	for _, res := range []string{"ippools", "bgppeers", "bfdprofiles", "bgpadvertisements"} {
		for _, tc := range []struct {
			verb, sub string
			allowed   bool
		}{
			{"list", "", true}, {"watch", "", true}, {"update", "status", true},
			{"create", "", false}, {"update", "", false}, {"patch", "", false}, {"delete", "", false},
		} {
			name := strings.Join([]string{"shardlb", map[bool]string{true: "may", false: "may not"}[tc.allowed], tc.verb, res}, " ")
			if tc.sub != "" {
				name += "/" + tc.sub
			}
			t.Run(name, func(t *testing.T) {
				r, err := c.client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
					Spec: authorizationv1.SubjectAccessReviewSpec{
						User:               "system:serviceaccount:kube-system:shardlb",
						Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"},
						ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: tc.verb, Group: "shardlb.io", Resource: res, Subresource: tc.sub},
					},
				}, metav1.CreateOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if r.Status.Allowed != tc.allowed {
					t.Errorf("allowed = %v, want %v", r.Status.Allowed, tc.allowed)
				}
			})
		}
	}
}
