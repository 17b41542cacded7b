{{/* Names and labels shared by every template. */}}
{{- define "sdmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sdmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sdmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sdmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sdmesh
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "host"). */}}
{{- define "sdmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sdmesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sdmesh.componentLabels" -}}
{{ include "sdmesh.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* image reference: include with (dict "ctx" $ "image" .Values.images.host). */}}
{{- define "sdmesh.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The NATS URL the services use: the given one, or the built-in server's Service. */}}
{{- define "sdmesh.natsUrl" -}}
{{- if .Values.nats.url -}}
{{- .Values.nats.url -}}
{{- else if .Values.nats.deploy -}}
{{- printf "nats://%s-nats.%s.svc:4222" (include "sdmesh.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- fail "nats.url is empty and nats.deploy is false: give the URL of a NATS server with JetStream (nats.url), or set nats.deploy=true" -}}
{{- end -}}
{{- end -}}

{{- define "sdmesh.storageClaimName" -}}
{{- default (printf "%s-storage" (include "sdmesh.fullname" .)) .Values.storage.persistentVolumeClaim.claimName -}}
{{- end -}}

{{/* The shared storage volume of the per-host pod. */}}
{{- define "sdmesh.storageVolume" -}}
- name: storage
{{- if eq .Values.storage.type "hostPath" }}
  hostPath:
    path: {{ .Values.storage.hostPath.path }}
    type: {{ .Values.storage.hostPath.type }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "sdmesh.storageClaimName" . }}
{{- end }}
{{- end -}}

{{/* TLS: the Secret's volume mount and environment (the services do not read them yet). */}}
{{- define "sdmesh.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: SDMESH_TLS_CERT_FILE
  value: /etc/sdmesh/tls/tls.crt
- name: SDMESH_TLS_KEY_FILE
  value: /etc/sdmesh/tls/tls.key
- name: SDMESH_TLS_CA_FILE
  value: /etc/sdmesh/tls/ca.crt
{{- end }}
{{- end -}}

{{- define "sdmesh.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/sdmesh/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "sdmesh.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled is true" .Values.tls.secretName }}
{{- end }}
{{- end -}}

{{/* Restricted security context of the sdmesh service containers. */}}
{{- define "sdmesh.serviceSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
