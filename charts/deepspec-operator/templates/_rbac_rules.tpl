{{/*
The operator's permissions: exactly the verbs it and kopf use (tests/operator check them against the
requests recorded by the mock API). Shared by the ClusterRole (cluster-wide install) and the Role of
each watched namespace (namespaced install).
*/}}
{{- define "deepspec-operator.rules" -}}
# the custom resource: watched, its status written (kopf's watch + our reconcile)
- apiGroups: ["deepspec.io"]
  resources: ["drafttrainings"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["deepspec.io"]
  resources: ["drafttrainings/status"]
  verbs: ["get", "patch"]
# children carry ownerReferences with blockOwnerDeletion: the API server (OwnerReferencesPermissionEnforcement,
# on by default on OpenShift) requires update on the owner's finalizers subresource
- apiGroups: ["deepspec.io"]
  resources: ["drafttrainings/finalizers"]
  verbs: ["update"]
# the run volume: created, expanded when spec.storage.pvc.size grows; never deleted by the operator
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "patch"]
# children: created; listed and deleted when their run is superseded (no GPU left behind)
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "create", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["get", "list", "create", "delete"]
{{- with .Values.rbac.servingResources }}
# serving resources named in spec.publish.servingRef (their draft path set to the promoted draft);
# Deployments are covered above
{{- toYaml . | nindent 0 }}
{{- end }}
# evaluation summaries are read from the pods' termination messages
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# Events on stage transitions and refused creates
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
