// The seed article's cluster.js (one cluster.fork() per CPU; WORKERS=N overrides), unchanged but for
// these two lines and a SIGTERM handler.
// Seed's recommended setup: cluster.fork() per os.cpus(), workers load the app.
var cluster = require('cluster'), os = require('os');
if (cluster.isPrimary) {
  var n = +(process.env.WORKERS || os.cpus().length);
  for (var i = 0; i < n; i++) cluster.fork();
  process.on('SIGTERM', function(){
    var left = Object.keys(cluster.workers).length;
    for (var id in cluster.workers) { cluster.workers[id].on('exit', function(){ if (--left === 0) process.exit(0); }); cluster.workers[id].process.kill('SIGTERM'); }
  });
} else {
  require('./app.js');
}
