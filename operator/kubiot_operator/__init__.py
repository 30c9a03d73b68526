"""kubiot operator: reconciles Tenants, Devices, Gateways and FirmwareReleases."""

API_GROUP = "kubiot.io"
API_VERSION = "v1alpha1"
