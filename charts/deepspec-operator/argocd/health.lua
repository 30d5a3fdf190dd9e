-- Argo CD health check for deepspec.io/DraftTraining.
-- Install: argocd-cm, key "resource.customizations.health.deepspec.io_DraftTraining" (docs/operator.md).
-- Tested with a Lua interpreter on every phase (tests/operator/test_gitops_health.py).
local hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile"
  return hs
end
local st = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and st.observedGeneration ~= nil and st.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local phase = st.phase
local message = st.message or phase
local serving = false
if st.conditions ~= nil then
  for _, c in ipairs(st.conditions) do
    if c.type == "Serving" and c.status == "True" then
      serving = true
    end
  end
end
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Suspended" then
  hs.status = "Suspended"
elseif phase == "Stalled" or phase == "GateFailed" then
  hs.status = "Degraded"
  if serving then
    message = message .. " (the previous draft keeps serving)"
  end
else
  hs.status = "Progressing"
  if serving then
    message = phase .. " (a good draft keeps serving)"
  end
end
hs.message = message
return hs
