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

{{/*
The NATS URL the services use: the given one (several comma-separated for a cluster), the
built-in server's Service, or every node of the built-in cluster (a client moves to another
node when its own goes away; the nodes do not advertise pod IPs, which the certificate lacks).
*/}}
{{- define "sdmesh.natsUrl" -}}
{{- if .Values.nats.url -}}
{{- .Values.nats.url -}}
{{- else if and .Values.nats.deploy (gt (int .Values.nats.replicas) 1) -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.nats.replicas) -}}
{{- $urls = append $urls (printf "nats://%s:4222" (include "sdmesh.natsNodeHost" (dict "ctx" $ "index" $i))) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else if .Values.nats.deploy -}}
{{- printf "nats://%s-nats.%s.svc:4222" (include "sdmesh.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- fail "nats.url is empty and nats.deploy is false: give the URL of a NATS server with JetStream (nats.url), or set nats.deploy=true" -}}
{{- end -}}
{{- end -}}

{{/* DNS name of node i of the built-in NATS cluster: include with (dict "ctx" $ "index" i). */}}
{{- define "sdmesh.natsNodeHost" -}}
{{- $fullname := include "sdmesh.fullname" .ctx -}}
{{- printf "%s-nats-%d.%s-nats-headless.%s.svc" $fullname (int .index) $fullname .ctx.Release.Namespace -}}
{{- end -}}

{{/*
JetStream replicas of the scheduler's KV buckets and event stream (SDMESH_NATS_REPLICAS):
nats.streamReplicas, else min(nats.replicas, 3) on the built-in NATS, else 1.
*/}}
{{- define "sdmesh.natsStreamReplicas" -}}
{{- $builtin := and .Values.nats.deploy (not .Values.nats.url) -}}
{{- $nodes := int .Values.nats.replicas -}}
{{- if .Values.nats.streamReplicas -}}
{{- if and $builtin (gt (int .Values.nats.streamReplicas) $nodes) -}}
{{- fail (printf "nats.streamReplicas (%d) is more than the built-in NATS has nodes (nats.replicas %d)" (int .Values.nats.streamReplicas) $nodes) -}}
{{- end -}}
{{- int .Values.nats.streamReplicas -}}
{{- else if $builtin -}}
{{- min 3 $nodes -}}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/*
SDMESH_STORAGE_ROOTS: storage.roots (each beneath storage.mountPath, the only shared storage
the containers see), or storage.mountPath itself when the list is empty.
*/}}
{{- define "sdmesh.storageRoots" -}}
{{- $mount := trimSuffix "/" .Values.storage.mountPath -}}
{{- $roots := list -}}
{{- range .Values.storage.roots -}}
{{- $r := trimSuffix "/" . -}}
{{- if or (not (hasPrefix "/" $r)) (contains "/../" (printf "%s/" $r)) -}}
{{- fail (printf "storage.roots: %q is not an absolute path without '..'" .) -}}
{{- end -}}
{{- if not (or (eq $r $mount) (hasPrefix (printf "%s/" $mount) $r)) -}}
{{- fail (printf "storage.roots: %q is not beneath storage.mountPath (%s), the only shared storage the containers see" . $mount) -}}
{{- end -}}
{{- $roots = append $roots $r -}}
{{- end -}}
{{- if not $roots -}}{{- $roots = list $mount -}}{{- end -}}
{{- join "," $roots -}}
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

{{/* Plaintext is refused unless the value says the user understands what it does. */}}
{{- define "sdmesh.insecure" -}}
{{- if .Values.insecure.enabled -}}
{{- if not .Values.insecure.iUnderstandThisDisablesAuthentication -}}
{{- fail "insecure.enabled=true turns off mTLS, authorization and NATS credentials: anybody who reaches a port can delete disks and take leases. Set insecure.iUnderstandThisDisablesAuthentication=true as well if that is really what you want (test clusters only)" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* The nodes that run the per-host services, as a JSON list: hosts, else hostIds.nodeIds' keys. */}}
{{- define "sdmesh.hosts" -}}
{{- $hosts := .Values.hosts -}}
{{- if and (not $hosts) (eq .Values.hostIds.source "map") -}}
{{- $hosts = keys .Values.hostIds.nodeIds | sortAlpha -}}
{{- end -}}
{{- range $hosts -}}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$" .) -}}
{{- fail (printf "hosts: %q is not a usable node name (lowercase letters, digits, '.', '-'; at most 63)" .) -}}
{{- end -}}
{{- if eq . "scheduler" -}}
{{- fail "hosts: a node named \"scheduler\" would share the scheduler's NATS user; rename it or use another node" -}}
{{- end -}}
{{- end -}}
{{- toJson (default (list) $hosts) -}}
{{- end -}}

{{- define "sdmesh.tlsSecretPrefix" -}}
{{- default (printf "%s-tls" (include "sdmesh.fullname" .)) .Values.tls.secretPrefix -}}
{{- end -}}

{{- define "sdmesh.natsSecretPrefix" -}}
{{- default (printf "%s-nats-user" (include "sdmesh.fullname" .)) .Values.nats.auth.secretPrefix -}}
{{- end -}}

{{/* TLS Secret name of one workload: include with (dict "ctx" $ "id" "scheduler"|"host-<node>-<service>"|"nats"|"user-<name>"). */}}
{{- define "sdmesh.tlsSecretName" -}}
{{- printf "%s-%s" (include "sdmesh.tlsSecretPrefix" .ctx) .id -}}
{{- end -}}

{{/* TLS environment of an sdmesh service (or SDMESH_INSECURE). */}}
{{- define "sdmesh.tlsEnv" -}}
{{- if include "sdmesh.insecure" . }}
- name: SDMESH_INSECURE
  value: "true"
{{- else }}
- name: SDMESH_TLS_CA
  value: /etc/sdmesh/tls/ca.crt
- name: SDMESH_TLS_CERT
  value: /etc/sdmesh/tls/tls.crt
- name: SDMESH_TLS_KEY
  value: /etc/sdmesh/tls/tls.key
- name: SDMESH_TLS_RELOAD_MS
  value: {{ .Values.tls.reloadMs | quote }}
{{- end }}
- name: SDMESH_GRPC_REFLECTION
  value: {{ .Values.grpc.reflection | quote }}
{{- end -}}

{{/* NATS credentials of a workload: include with (dict "ctx" $ "user" "scheduler"|<node>). */}}
{{- define "sdmesh.natsEnv" -}}
{{- if not (include "sdmesh.insecure" .ctx) }}
- name: SDMESH_NATS_USER
  value: {{ .user | quote }}
- name: SDMESH_NATS_PASSWORD_FILE
  value: /etc/sdmesh/nats/password
{{- end }}
{{- end -}}

{{/* Mounts of the TLS and NATS Secrets: whole volumes, never subPath (subPath does not see
     rotations). include with (dict "ctx" $ "tlsVolume" "tls"). */}}
{{- define "sdmesh.secretMounts" -}}
{{- if not (include "sdmesh.insecure" .ctx) }}
- name: {{ .tlsVolume }}
  mountPath: /etc/sdmesh/tls
  readOnly: true
- name: nats-credentials
  mountPath: /etc/sdmesh/nats
  readOnly: true
{{- end }}
{{- end -}}

{{/* Secret volumes: include with (dict "ctx" $ "tlsId" "scheduler" "natsUser" "scheduler"). */}}
{{- define "sdmesh.secretVolumes" -}}
{{- if not (include "sdmesh.insecure" .ctx) }}
- name: tls
  secret:
    secretName: {{ include "sdmesh.tlsSecretName" (dict "ctx" .ctx "id" .tlsId) }}
    defaultMode: 288 # 0440: owner and group read
- name: nats-credentials
  secret:
    secretName: {{ printf "%s-%s" (include "sdmesh.natsSecretPrefix" .ctx) .natsUser }}
    defaultMode: 288 # 0440: owner and group read
{{- end }}
{{- end -}}

{{/* Probes on GET /healthz of the metrics port (the gRPC health service needs a client certificate). */}}
{{- define "sdmesh.httpProbes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  periodSeconds: 2
  failureThreshold: 60
readinessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  periodSeconds: 5
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end -}}

{{/* Restricted security context of the sdmesh service containers. */}}
{{- define "sdmesh.serviceSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* NetworkPolicy egress rule to NATS: the built-in server's pods, or networkPolicy.externalNats. */}}
{{- define "sdmesh.natsEgress" -}}
{{- if and .Values.nats.deploy (not .Values.nats.url) -}}
- to:
    - podSelector:
        matchLabels:
          {{- include "sdmesh.selectorLabels" (dict "ctx" $ "component" "nats") | nindent 10 }}
  ports: [{ protocol: TCP, port: 4222 }]
{{- else -}}
- ports: [{ protocol: TCP, port: {{ .Values.networkPolicy.externalNats.port }} }]
  {{- with .Values.networkPolicy.externalNats.peers }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end -}}
