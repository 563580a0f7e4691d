{{/* The labels every object carries, as in manifest/. */}}
{{- define "shardlb.labels" -}}
app.kubernetes.io/name: shardlb
{{- end -}}
