{{/* The CSI driver (csi.enabled): helpers shared by the csi-*.yaml templates and the per-host DaemonSet. */}}

{{/* The driver name: fixed, the plugin reports it (services/csi/src/plugin.ts DRIVER_NAME). */}}
{{- define "sdmesh.csi.driverName" -}}
csi.sdmesh.io
{{- end -}}

{{/* A sidecar image reference: include with (dict "image" .Values.csi.images.provisioner). */}}
{{- define "sdmesh.csi.sidecarImage" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository .image.tag -}}
{{- end -}}
{{- end -}}

{{/* The domains named by csi.storageClasses, each once, as a JSON list. */}}
{{- define "sdmesh.csi.domains" -}}
{{- $domains := list -}}
{{- range .Values.csi.storageClasses -}}
{{- $domains = append $domains .domain -}}
{{- end -}}
{{- toJson ($domains | uniq) -}}
{{- end -}}

{{/* The restricted security context of a sidecar (the images are static binaries). */}}
{{- define "sdmesh.csi.sidecarSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/*
The containers the CSI driver adds to the per-host pod: the node plugin (beside sanlock and the
lease-manager, so the qemu-storage-daemon it starts is a lease holder sanlock can kill),
node-driver-registrar (tells kubelet about the plugin's socket) and livenessprobe.
include with (dict "ctx" $ "node" <node name or "">).
*/}}
{{- define "sdmesh.csi.nodeContainers" -}}
{{- $ := .ctx -}}
{{- $csi := $.Values.csi -}}
{{- $pluginDir := printf "%s/plugins/%s" $csi.node.kubeletDir (include "sdmesh.csi.driverName" $) -}}
- name: csi-node
  image: {{ include "sdmesh.image" (dict "ctx" $ "image" $.Values.images.host) }}
  imagePullPolicy: {{ $.Values.images.pullPolicy }}
  args: ["csi", "--mode", "node", "--csi-endpoint", "unix:///csi/csi.sock"]
  envFrom:
    - configMapRef:
        name: {{ include "sdmesh.fullname" $ }}-config
  env:
    # The node id kubelet registers (NodeGetInfo) and the sanlock host name: the node name.
    - name: SDMESH_HOST_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    - name: SANLOCK_RUN_DIR
      value: /run/sanlock
    # The storage daemons take their volume leases through this pod's lease-manager.
    - name: SDMESH_LEASE_MANAGER_ADDRESS
      value: "unix:///run/sdmesh/lease-manager.sock"
    - name: SDMESH_STATE_DIR
      value: /var/lib/sdmesh/csi-node
  ports:
    - name: csi-node-health
      containerPort: {{ $csi.node.healthPort }}
      protocol: TCP
  # livenessprobe (below) answers /healthz by calling the plugin's Probe on its socket.
  livenessProbe:
    httpGet:
      path: /healthz
      port: csi-node-health
    initialDelaySeconds: 10
    periodSeconds: 10
    timeoutSeconds: 5
    failureThreshold: 6
  securityContext:
    # Loop devices, FUSE exports, mkfs and mounts that kubelet and the pods must see.
    privileged: true
    runAsUser: 0
    runAsGroup: 0
  resources:
    {{- toYaml $csi.node.resources | nindent 4 }}
  volumeMounts:
    - name: csi-plugin-dir
      mountPath: /csi
    # Staging and publish targets are under the kubelet directory: mounts made here must
    # propagate back to the host (and from there into the pods).
    - name: csi-kubelet-dir
      mountPath: {{ $csi.node.kubeletDir }}
      mountPropagation: Bidirectional
    - name: csi-dev
      mountPath: /dev
    - name: csi-node-state
      mountPath: /var/lib/sdmesh/csi-node
    - name: sanlock-run
      mountPath: /run/sanlock
    - name: run-sdmesh
      mountPath: /run/sdmesh
      readOnly: true
    - name: storage
      mountPath: {{ $.Values.storage.mountPath }}
- name: csi-node-driver-registrar
  image: {{ include "sdmesh.csi.sidecarImage" (dict "image" $csi.images.nodeDriverRegistrar) }}
  imagePullPolicy: {{ $.Values.images.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --kubelet-registration-path={{ $pluginDir }}/csi.sock
    - --http-endpoint=:{{ $csi.node.registrarHealthPort }}
  ports:
    - name: registrar-hz
      containerPort: {{ $csi.node.registrarHealthPort }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: registrar-hz
    initialDelaySeconds: 5
    periodSeconds: 10
    timeoutSeconds: 5
  securityContext:
    {{- include "sdmesh.csi.sidecarSecurityContext" $ | nindent 4 }}
    # kubelet's registration directory belongs to root.
    runAsUser: 0
    runAsGroup: 0
  resources:
    {{- toYaml $csi.sidecarResources | nindent 4 }}
  volumeMounts:
    - name: csi-plugin-dir
      mountPath: /csi
    - name: csi-registration-dir
      mountPath: /registration
- name: csi-node-liveness
  image: {{ include "sdmesh.csi.sidecarImage" (dict "image" $csi.images.livenessProbe) }}
  imagePullPolicy: {{ $.Values.images.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --http-endpoint=:{{ $csi.node.healthPort }}
  securityContext:
    {{- include "sdmesh.csi.sidecarSecurityContext" $ | nindent 4 }}
    runAsUser: 0
    runAsGroup: 0
  resources:
    {{- toYaml $csi.sidecarResources | nindent 4 }}
  volumeMounts:
    - name: csi-plugin-dir
      mountPath: /csi
{{- end -}}

{{/* The volumes of the node plugin's containers (host paths of kubelet and the node). */}}
{{- define "sdmesh.csi.nodeVolumes" -}}
{{- $csi := .Values.csi -}}
# The plugin's socket, where kubelet looks for it (node-driver-registrar tells it the path).
- name: csi-plugin-dir
  hostPath:
    path: {{ printf "%s/plugins/%s" $csi.node.kubeletDir (include "sdmesh.csi.driverName" .) }}
    type: DirectoryOrCreate
- name: csi-registration-dir
  hostPath:
    path: {{ $csi.node.kubeletDir }}/plugins_registry
    type: Directory
- name: csi-kubelet-dir
  hostPath:
    path: {{ $csi.node.kubeletDir }}
    type: Directory
- name: csi-dev
  hostPath:
    path: /dev
    type: Directory
# What the node plugin staged (and which storage daemon serves it), kept across pod restarts
# so a new pod finds the mounts kubelet still expects.
- name: csi-node-state
  hostPath:
    path: {{ $csi.node.stateDir }}
    type: DirectoryOrCreate
{{- end -}}
